"""The GGUF file, read back with gguf-py's reader (no llama.cpp needed), and the inputs it refuses."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import qqq_compile as qc
from qqq_compile.annotations import node_annotation
from qqq_compile.cli.main import main
from qqq_compile.export import OutputExistsError
from qqq_compile.graph import info
from qqq_compile.targets.gguf.export import GGUFExportError
from qqq_compile.targets.gguf.vocab import VocabError
from tests.targets.gguf.conftest import gguf_calib, gguf_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def compiled():
    """A rotated, GPTQ-quantized tiny LLaMA (the default: untied head, quantized to Q4_0 with the
    other linears) and an RTN tiny Qwen2 whose tied head is kept in float (one Q8_0 table)."""
    out = {}
    out["llama"] = qc.compile(gguf_model("llama"), gguf_calib(4), {"quant": {"target": "gguf"}}, progress=False)
    qwen = gguf_model("qwen2", tie_word_embeddings=True)
    cfg = {"preset": "rtn", "quant": {"target": "gguf", "skip": ["lm_head"]}}
    out["qwen2"] = qc.compile(qwen, gguf_calib(2), cfg, progress=False)
    return out


def hf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp's converter applies it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    return fields, {t.name: t for t in r.tensors}


def decoded(t) -> torch.Tensor:
    shape = tuple(reversed(t.shape.tolist()))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_file_holds_exactly_the_compiled_weights(compiled, tokenizer, tmp_path, arch):
    c = compiled[arch]
    path = c.target.export("gguf", c, tmp_path / "m.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")
    fields, tensors = read(path)
    cfg = c.model_config
    assert fields["general.architecture"] == arch and fields["general.file_type"] == 2  # MOSTLY_Q4_0
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields[f"{arch}.feed_forward_length"] == 160
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    n_q4 = 0
    for n in c.graph_module.graph.nodes:
        li = info(n)
        if li is None or li.packed is None or not li.lowered:
            continue
        if li.fqn == "lm_head":
            t, proj = tensors["output.weight"], "lm_head"
        else:
            layer, proj = li.fqn.split(".")[2], li.fqn.split(".")[-1]
            role = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}.get(proj)
            t = tensors[f"blk.{layer}.{role or 'ffn_' + proj.removesuffix('_proj')}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        want = li.packed.dequantize()
        if arch == "llama" and proj in ("q_proj", "k_proj"):
            want = hf_permute(want, 4 if proj == "q_proj" else 2)
        assert torch.equal(decoded(t), want)
        n_q4 += 1
    for name in ("blk.0.attn_norm.weight", "blk.1.ffn_norm.weight", "output_norm.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
    if arch == "qwen2":  # tied, kept in float, not rotated: one Q8_0 table, llama.cpp reuses it for the output
        assert n_q4 == 14 and tensors["token_embd.weight"].tensor_type == Q8_0
        assert "output.weight" not in tensors and "blk.0.attn_q.bias" in tensors
        assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    else:  # the default: rotated, the head (its own table) GPTQ'd to Q4_0, a Q4_0 embedding
        assert n_q4 == 15 and tensors["output.weight"].tensor_type == Q4_0
        assert tensors["token_embd.weight"].tensor_type == Q4_0
        assert torch.equal(decoded(tensors["output_norm.weight"]), torch.ones(64))  # folded by rotate
        assert fields["llama.rope.dimension_count"] == 16


def test_file_is_written_atomically_and_never_replaced_silently(compiled, tokenizer, tmp_path):
    c, out = compiled["qwen2"], tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        c.target.export("gguf", c, out, tokenizer=tokenizer, tokenizer_pre="gpt-2")
    assert out.read_bytes() == b"keep me"
    c.target.export("gguf", c, out, tokenizer=tokenizer, tokenizer_pre="gpt-2", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


def test_missing_tokenizer_is_an_error(compiled, tmp_path):
    c = compiled["qwen2"]
    with pytest.raises(VocabError, match="carries its tokenizer and none was given"):
        c.target.export("gguf", c, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_pre_tokenizer_is_named(compiled, tokenizer, tmp_path):
    c = compiled["qwen2"]
    with pytest.raises(VocabError, match="tokenizer_pre=NAME"):
        c.target.export("gguf", c, tmp_path / "m.gguf", tokenizer=tokenizer)


def test_unsupported_architecture_is_named(compiled, tokenizer, tmp_path):
    c = compiled["qwen2"]
    cfg = {**c.model_config, "model_type": "mistral"}
    other = types.SimpleNamespace(model_config=cfg, graph_module=c.graph_module, model_class="MistralForCausalLM")
    with pytest.raises(GGUFExportError, match=r"model_type 'mistral' has no GGUF mapping.*llama, qwen2"):
        c.target.export("gguf", other, tmp_path / "m.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")


def test_online_hadamard_is_refused(compiled, tokenizer, tmp_path):
    """A pass list that forced an online Hadamard back in computes what llama.cpp cannot."""
    from qqq_compile.annotations import annotate

    c = compiled["qwen2"]
    node = next(n for n in c.graph_module.graph.nodes if n.op == "call_function")
    before = node_annotation(node)
    annotate(node, online_hadamard=64)
    try:
        with pytest.raises(GGUFExportError, match="online Hadamard"):
            c.target.export("gguf", c, tmp_path / "m.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")
    finally:
        annotate(node, online_hadamard=before.online_hadamard)


def test_cli_refuses_a_w4a8_artifact_as_gguf(tmp_path, tokenizer, capsys):
    model = gguf_model("llama")
    w4a8 = qc.compile(model, gguf_calib(2), {"preset": "rtn"}, progress=False)
    w4a8.save(str(tmp_path / "w4a8"), tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "w4a8"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "target 'w4a8' cannot be written as gguf" in err and "--target gguf" in err
    assert not (tmp_path / "m.gguf").exists()


def test_cli_exports_a_gguf_artifact(compiled, tokenizer, tmp_path, monkeypatch):
    """The CLI passes the artifact's tokenizer and --force through to the writer."""
    c = compiled["qwen2"]
    c.save(str(tmp_path / "art"), tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    monkeypatch.setattr("qqq_compile.targets.gguf.vocab.PRE_BY_HASH", _known_as_gpt2(tokenizer))
    assert main(["export", str(tmp_path / "art"), "--format", "gguf", "--out", str(out)]) == 2  # no --force
    assert main(["export", str(tmp_path / "art"), "--format", "gguf", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert np.array_equal(read(out)[1]["token_embd.weight"].data.shape, (320, 68))  # 320 rows of 2 Q8_0 blocks


def _known_as_gpt2(tokenizer) -> dict:
    from hashlib import sha256

    from qqq_compile.targets.gguf.pretokenizers import CHKTXT, PRE_BY_HASH

    return {**PRE_BY_HASH, sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest(): "gpt-2"}
