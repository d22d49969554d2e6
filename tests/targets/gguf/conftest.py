"""Fixtures of the GGUF target's tests: a small byte-level BPE tokenizer llama.cpp can load,
tiny LLaMA / Qwen2 models sized for it, and the llama.cpp environment (or a skip)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import tiny_calib, tiny_model

VOCAB = 320  # 256 bytes + 1 special + merges; a multiple of 32 like every GGUF row count here
TEXT = (
    "The quick brown fox jumps over the lazy dog. A compiler lowers a graph to kernels; "
    "llama.cpp reads blocks of thirty-two weights with one scale each. Quantization rounds "
    "every weight to a grid, and calibration chooses the grid. The dog sleeps in the sun. "
) * 20


def tiny_tokenizer():
    """A GPT-2 style byte-level BPE trained on :data:`TEXT` (llama.cpp's ``gpt-2`` pre-tokenizer
    splits as it does), ``<|endoftext|>`` as BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def gguf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random model of ``arch`` whose vocabulary fits :func:`tiny_tokenizer`."""
    return tiny_model(arch, seed=seed, vocab_size=VOCAB, **overrides)


def gguf_calib(n: int = 8, seq: int = 32):
    return tiny_calib(n, seq, vocab=VOCAB)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llamacpp():
    """The llama.cpp runner; skips (fails with ``QQQ_REQUIRE_LLAMACPP=1``) without its environment."""
    from qqq_compile.targets.gguf.llamacpp import llamacpp_python, run_llamacpp

    if llamacpp_python() is None:
        msg = (
            "llama.cpp environment missing: run `benchmarks/peers/setup.sh llamacpp` "
            "(or set QQQ_LLAMACPP_PYTHON to a Python with llama-cpp-python)"
        )
        if os.environ.get("QQQ_REQUIRE_LLAMACPP") == "1":
            pytest.fail(msg + " (QQQ_REQUIRE_LLAMACPP=1)")
        pytest.skip(msg)
    return run_llamacpp
