"""Streaming compile: a checkpoint on disk quantized one block at a time equals the
in-memory compile, never holds more than one block of float weights, and leaves the
user's files alone."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qqq_compile as qc
from qqq_compile.compiler.api import compile_from_disk
from qqq_compile.compiler.block_runner import BlockRunner
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.streaming import (
    LazyWeight,
    StreamingError,
    StreamWeights,
    attr_targets,
    build_skeleton,
    index_folder,
    read_tensor,
    weight_sources,
)
from qqq_compile.graph import get_attr, linear_sites, set_attr
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default


def _save(tmp_path: Path, arch: str = "llama", **overrides) -> Path:
    folder = tmp_path / "model"
    tiny_model(arch, **overrides).save_pretrained(folder)
    return folder


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
    }


def _count(gm: torch.fx.GraphModule, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is op)


def _assert_one_block(stats) -> None:
    # The float weights read from disk and alive at any moment: at most one decoder
    # block's worth, plus the weights outside the blocks (embeddings, norm, lm_head).
    assert stats.block_bytes > 0 and stats.total_bytes > 2 * stats.block_bytes + stats.other_bytes
    assert stats.peak_block_bytes <= stats.block_bytes
    assert stats.peak_bytes <= stats.block_bytes + stats.other_bytes


def _reference(folder: Path, calib, config) -> qc.CompiledModel:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return qc.compile(model, calib, config, progress=False)


def test_rtn_streamed_equals_in_memory_tied(tmp_path):
    # Tied embeddings: the checkpoint stores lm_head.weight only as embed_tokens.weight.
    folder = _save(tmp_path, num_hidden_layers=4, tie_word_embeddings=True)
    before = _fingerprint(folder)
    calib = tiny_calib(8, 32)
    ref = _reference(folder, calib, {"preset": "rtn"})
    got = qc.compile(folder, calib, {"preset": "rtn"}, progress=False, streaming=True)
    assert _count(got.graph_module, W4A8) == _count(ref.graph_module, W4A8) == 4 * 7
    assert not any(isinstance(t, LazyWeight) for t in got.graph_module.parameters())
    x = tiny_calib(2, 24, seed=1)[0]
    assert torch.equal(got(x).logits, ref(x).logits)
    _assert_one_block(got.stream_stats)
    assert got.stream_stats.spilled == 0  # rtn changes no float weight
    assert _fingerprint(folder) == before


def test_qqq_streamed_equals_in_memory(tmp_path):
    # MHA: smoothing folds into norms and into v_proj/up_proj (spilled to scratch), GPTQ
    # then reads the smoothed weights back block by block.
    folder = _save(tmp_path, "llama_mha", num_hidden_layers=3)
    before = _fingerprint(folder)
    calib = tiny_calib(8, 32)
    cfg = {"preset": "qqq", "preset_options": {"smooth_options": {"n_grid": 4}}}
    ref = _reference(folder, calib, cfg)
    got = compile_from_disk(folder, calib, cfg, progress=False, scratch_dir=tmp_path)
    x = tiny_calib(2, 24, seed=1)[0]
    assert torch.equal(got(x).logits, ref(x).logits)
    methods = {li.method for li in got.linears() if li.lowered}
    assert methods == {"gptq"}
    st = got.stream_stats
    _assert_one_block(st)
    assert st.spilled > 0 and st.bytes_spilled > 0
    assert not list(tmp_path.glob("qqq-stream-*"))  # scratch files deleted
    assert _fingerprint(folder) == before


def test_default_preset_streams_the_rotation(tmp_path):
    # The default preset (qqq_rot) starts with rotate, which rewrites every weight outside
    # the block runner. It does so one segment at a time inside resident() scopes, so the
    # streamed compile still holds one block of float weights (before: the whole rotated
    # model, 4 blocks here). Tied embeddings: the untied lm_head is a second lazy handle.
    folder = _save(tmp_path, num_hidden_layers=4, tie_word_embeddings=True)
    before = _fingerprint(folder)
    calib = tiny_calib(8, 32)
    ref = _reference(folder, calib, None)
    got = compile_from_disk(folder, calib, None, progress=False, scratch_dir=tmp_path)
    assert [p["name"] for p in got.report.pass_configs][0] == "rotate"
    assert any("rotated the residual stream" in n.message for n in got.report.notes)
    x = tiny_calib(2, 24, seed=1)[0]
    assert torch.equal(got(x).logits, ref(x).logits)
    st = got.stream_stats
    _assert_one_block(st)
    # Rotated weights go back to disk segment by segment, not at the end of the pass:
    # what rotate leaves in memory is its norm weights (made neutral). Before: all of it.
    assert 0 < st.held_bytes < st.block_bytes / 10
    assert st.spilled > 0
    assert not any(isinstance(t, LazyWeight) for t in got.graph_module.parameters())
    assert not list(tmp_path.glob("qqq-stream-*"))
    assert _fingerprint(folder) == before


def test_lazy_weight_reads_only_when_used(tmp_path):
    folder = _save(tmp_path)
    skeleton = build_skeleton(folder)
    sources = weight_sources(skeleton, index_folder(folder))
    gm = capture(skeleton).graph_module
    stream = StreamWeights(sources, {k: torch.float32 for k in sources})
    stream.before_pipeline(gm)
    site = linear_sites(gm)[0]  # matching reads shapes only
    w = get_attr(gm, site.weight.target)
    assert isinstance(w, LazyWeight) and isinstance(w.detach(), LazyWeight)
    assert stream.store.stats.reads == 0
    expect = read_tensor(sources[site.weight.target])
    assert torch.equal(w * 1, expect)  # any op reads the data
    assert type(w * 1) is torch.Tensor
    assert stream.store.stats.reads == 1

    # The runner makes a block resident, then returns its weights to disk; a weight a
    # pass replaced is spilled and read back with its new value.
    runner = BlockRunner(gm, [{"input_ids": tiny_calib(1, 8)[0]}], progress=False)
    for st in runner.blocks():
        ws = {t: get_attr(gm, t) for t in attr_targets(st.block.nodes)}
        assert ws and not any(isinstance(t, LazyWeight) for t in ws.values())
        if st.index == 0:
            target = next(iter(sorted(ws)))
            set_attr(gm, target, ws[target] * 2)
    after = get_attr(gm, target)
    assert isinstance(after, LazyWeight)
    assert torch.equal(after * 1, read_tensor(sources[target]) * 2)
    assert stream.store.stats.spilled == 1
    stream.finish(gm)
    assert not any(isinstance(t, LazyWeight) for t in gm.parameters())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match="streaming=True"):
        qc.compile(str(tmp_path), tiny_calib(2, 8))
    with pytest.raises(StreamingError, match="config.json"):
        compile_from_disk(tmp_path)
    folder = _save(tmp_path)
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(StreamingError, match="no .safetensors"):
        compile_from_disk(folder)
    with pytest.raises(TypeError, match="folder"):
        compile_from_disk(tiny_model())  # type: ignore[arg-type]


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(StreamingError, match="down_proj"):
        compile_from_disk(folder, tiny_calib(2, 8))
