"""Shared fixtures: tiny random-weight models (fast) and the real SmolLM2 (slow)."""

from __future__ import annotations

import os

# Kernels must see TRITON_INTERPRET before their @triton.jit decorators run, and any
# test module may import qqq_compile (which imports the kernels) first.
os.environ.setdefault("TRITON_INTERPRET", "1")
# save() ships an AOT-compiled decode step by default (a minute per model): tests that
# check it ask for it (prepare_step=True); every other save stays fast.
os.environ.setdefault("QQQ_SAVE_STEP", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(arch: str = "llama", **overrides):
    """A small config of a known architecture (no downloads)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    elif arch == "llama_mha":
        cfg = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    elif arch == "opt":
        cfg = tf.OPTConfig(
            vocab_size=256,
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.use_cache = False
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def tiny_calib(n: int = 8, seq: int = 32, vocab: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def calib():
    return tiny_calib()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M (converted once, then cached)."""
    from qqq_compile.models import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def wiki_splits(smollm2):
    """The standard protocol: (calib windows, eval windows) of BOS + 511 tokens."""
    from qqq_compile.data import standard_splits

    return standard_splits(smollm2[1])
