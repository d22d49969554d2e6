"""Artifacts: compile, save, load (capture + replay), same logits; atomic writes; clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qqq_compile
from qqq_compile import artifact
from qqq_compile.annotations import LEGACY_NODE_KEYS, node_annotation, replay_states, set_replay_state
from qqq_compile.artifact import MANIFEST, WEIGHTS, ArtifactError, load, load_tokenizer, save
from qqq_compile.compiler.passes.calibrate import Calibrate
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import PassResult, QQQPass, register_pass
from qqq_compile.graph import linear_sites
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default
REPO = Path(__file__).resolve().parents[1]


def count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def compile_tiny(seed: int = 0, **cfg):
    model = tiny_model("llama", seed=seed, num_hidden_layers=1)
    config = {"preset": "rtn", "quant": {"group_size": 32}, **cfg}
    return qqq_compile.compile(model, tiny_calib(), config, progress=False)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(compiled tiny llama, artifact folder, input ids, logits before saving)."""
    compiled = compile_tiny()
    path = tmp_path_factory.mktemp("art") / "tiny"
    save(compiled, path, tokenizer=tiny_tokenizer())
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = compiled(x).logits
    return compiled, path, x, ref


@pytest.fixture(scope="module")
def loaded(saved):
    return load(saved[1])


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved artifact to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


# ----------------------------------------------------------------------------- round trip


def test_manifest_records_config_pipeline_and_layers(saved):
    compiled, path, _, _ = saved
    m = json.loads((path / MANIFEST).read_text())
    assert (m["format"], m["format_version"]) == ("qqq_compile.artifact", "1.2")
    assert m["decode_step"] is None  # QQQ_SAVE_STEP=0 (tests/conftest.py): no AOT compile per save
    assert m["pipeline"] == ["quantize_rtn", "lower", "int8_head"]  # the int8 lm_head is the default
    assert m["pass_configs"][-1] == {"name": "int8_head", "options": {"embedding": True}}
    assert m["compile_config"]["quant"]["group_size"] == 32
    assert m["model_class"] == "LlamaForCausalLM" and m["model_config"]["hidden_size"] == 64
    by_name = {r["name"]: r for r in m["layers"]}
    assert len(by_name) == 7  # the 7 projections; the lm_head is W8A8, no longer a float linear
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert (q["format"], q["bits"], q["group_size"], q["method"], q["lowered"]) == ("w4a8", 4, 32, "rtn", True)
    assert q["shape"] == [64, 64] and q["smoothed"] is False
    assert "lm_head" not in by_name
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.rglob("*"))  # never pickle


def test_load_gives_identical_logits(saved, loaded):
    compiled, _, x, ref = saved
    with torch.no_grad():
        out = loaded(x).logits
    assert torch.equal(out, ref)
    assert count(loaded.graph_module, W4A8) == count(compiled.graph_module, W4A8) == 7
    assert [li.fqn for li in loaded.linears()] == [li.fqn for li in compiled.linears()]
    for a, b in zip(loaded.linears(), compiled.linears(), strict=True):
        assert (a.packed is None) == (b.packed is None) and a.lowered == b.lowered
        if a.packed is not None:
            assert torch.equal(a.packed.qweight, b.packed.qweight)
            assert torch.equal(a.packed.group_scale, b.packed.group_scale)
    assert loaded.report.pipeline == compiled.report.pipeline
    assert loaded.weight_bytes() == compiled.weight_bytes()


def test_load_other_shapes_and_tokenizer(saved, loaded):
    _, path, _, _ = saved
    x = torch.randint(0, 256, (1, 7))
    assert loaded(x).logits.shape == (1, 7, 256)
    tok = load_tokenizer(path)
    assert tok("w1 w2 w3", add_special_tokens=False)["input_ids"] == [4, 5, 6]


def test_tied_conv1d_model_round_trip(tmp_path):
    # GPT-2: lm_head tied to the embedding, transposed Conv1D weights, biases
    model = tiny_model("gpt2")
    compiled = qqq_compile.compile(model, tiny_calib(), {"preset": "rtn"}, progress=False)
    x = torch.randint(0, 256, (2, 16))
    save(compiled, tmp_path / "gpt2")
    back = load(tmp_path / "gpt2")
    assert torch.equal(back(x).logits, compiled(x).logits)
    assert count(back.graph_module, W4A8) == 8


def test_same_model_data_seed_give_byte_identical_files(saved, tmp_path):
    save(compile_tiny(), tmp_path / "again", tokenizer=tiny_tokenizer())
    first = {p.relative_to(saved[1]): p.read_bytes() for p in saved[1].rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


# ----------------------------------------------------------------------------- atomic writes


def test_save_replaces_an_artifact_and_refuses_other_folders(saved, tmp_path):
    target = tmp_path / "t"
    save(saved[0], target, tokenizer=tiny_tokenizer())
    save(saved[0], target)  # replaced by an artifact without a tokenizer
    assert not (target / "tokenizer").exists() and load_tokenizer(target) is None
    assert (target / WEIGHTS).read_bytes() == (saved[1] / WEIGHTS).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp or old folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a qqq_compile artifact"):
        save(saved[0], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from qqq_compile import CompiledModel, artifact
    from qqq_compile.artifact import files

    real = files.save_file

    def slow_writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # as if the process died halfway through the write
            f.truncate(Path(filename).stat().st_size // 2)
        Path(sys.argv[2]).write_text("writing")
        time.sleep(600)

    files.save_file = slow_writer
    # What is saved does not matter here, only how: a small traced graph is enough.
    gm = torch.fx.symbolic_trace(torch.nn.Linear(64, 64))
    compiled = CompiledModel(gm, input_names=["x"], output_kind="tensor", model_config={"x": 1}, model_class="M")
    artifact.save(compiled, sys.argv[1])
    """
)


def test_killed_save_leaves_previous_artifact_intact(saved, tmp_path):
    _, _, x, ref = saved
    target = tmp_path / "art"
    shutil.copytree(saved[1], target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(target), str(marker)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, "the saving process died before it reached the write"
            assert time.time() < deadline, "the saving process did not reach the write in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".art.qqq-tmp-")]
    assert len(leftovers) == 1 and not (leftovers[0] / MANIFEST).exists()  # killed mid-save
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["art", "marker"]
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert torch.equal(load(target)(x).logits, ref)
    save(saved[0], target)  # the next save sweeps what the dead process left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]


# ----------------------------------------------------------------------------- errors


def edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / MANIFEST).read_text())
    m.update(changes)
    (path / MANIFEST).write_text(json.dumps(m))


def test_missing_folder_and_manifest(tmp_path, copy):
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nothing")
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=f"{MANIFEST} is missing.*not a qqq_compile artifact"):
        load(copy)


def test_foreign_and_invalid_manifests(copy):
    edit_manifest(copy, format="someone.else")
    with pytest.raises(ArtifactError, match="format 'someone.else'.*not a qqq_compile artifact"):
        load(copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match=f"{MANIFEST} is not valid JSON"):
        load(copy)


def test_newer_major_version_asks_to_upgrade(copy):
    edit_manifest(copy, format_version="2.0")
    with pytest.raises(ArtifactError, match=r"format 2\.0.*reads format 1\.x only: upgrade qqq_compile"):
        load(copy)


def test_newer_minor_version_is_accepted(copy):
    edit_manifest(copy, format_version="1.7", some_future_field=True)
    assert artifact.read_manifest(copy)["format_version"] == "1.7"


def test_format_1_1_without_a_decode_step_loads_and_the_step_size_is_read(saved, copy):
    _, _, x, ref = saved
    m = json.loads((copy / MANIFEST).read_text())
    del m["decode_step"]  # added by format 1.2
    (copy / MANIFEST).write_text(json.dumps({**m, "format_version": "1.1"}))
    old = load(copy)
    assert torch.equal(old(x).logits, ref)
    assert old.aot_dir == str(copy.absolute() / "step") and old.step_size is None
    assert old.default_max_len() == 2048  # the tiny llama's context (2048), the default cap
    edit_manifest(copy, format_version="1.2", decode_step={"folder": "step", "max_batch": 1, "max_len": 512})
    assert load(copy).default_max_len() == 512  # generate() then sizes its step like the shipped one


def test_truncated_weights(copy):
    data = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is truncated or corrupt"):
        load(copy)


def test_missing_tensor(copy):
    tensors = load_file(str(copy / WEIGHTS))
    del tensors["model.norm.weight"]
    save_file(tensors, str(copy / WEIGHTS))
    with pytest.raises(ArtifactError, match=f"tensor 'model.norm.weight' is missing from .*{WEIGHTS}"):
        load(copy)


def test_shape_mismatch_in_file(copy):
    tensors = load_file(str(copy / WEIGHTS))
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, str(copy / WEIGHTS))
    with pytest.raises(ArtifactError, match=r"shape mismatch for tensor 'model.norm.weight'.*\[32\].*\[64\]"):
        load(copy)


def test_corrupt_bytes_fail_the_checksum(copy):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data: the header still parses
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the checksum"):
        load(copy)


def test_shape_mismatch_with_edited_config(copy):
    m = json.loads((copy / MANIFEST).read_text())
    m["model_config"]["vocab_size"] = 300
    (copy / MANIFEST).write_text(json.dumps(m))
    # the first tensor sized by the vocabulary: the int8 table of the (default) int8 embedding
    with pytest.raises(ArtifactError, match=r"shape mismatch for tensor 'qqq_model_embed_tokens_int8'.*config"):
        load(copy)


# ----------------------------------------------------------------------------- replaying structural passes


@register_pass("test_artifact_gain")
class InsertGain(QQQPass):
    """Test pass: scale the input of the first linear by a new buffer (deterministic rewrite)."""

    name = "test_artifact_gain"
    replay_mode = "rerun"

    def call(self, gm, ctx):
        site = linear_sites(gm)[0]
        gm.register_buffer("qqq_test_gain", torch.full((site.x.meta["val"].shape[-1],), 1.5))
        with gm.graph.inserting_before(site.node):
            gain = gm.graph.get_attr("qqq_test_gain")
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (site.x, gain))
        site.node.replace_input_with(site.x, scaled)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


@register_pass("test_artifact_chosen")
class HalveChosen(QQQPass):
    """Test pass: halve the input of a linear chosen from calibration data; replays from state."""

    name = "test_artifact_chosen"

    def call(self, gm, ctx):
        sites = linear_sites(gm)
        i = int(ctx.calib[0]["input_ids"].sum()) % len(sites)
        set_replay_state(gm, self.name, {"site": sites[i].name})
        return self.replay(gm, ctx, replay_states(gm)[self.name])

    def replay(self, gm, ctx, state):
        site = next(s for s in linear_sites(gm) if s.name == state["site"])
        with gm.graph.inserting_before(site.node):
            half = gm.graph.call_function(torch.ops.aten.mul.Tensor, (site.x, 0.5))
        site.node.replace_input_with(site.x, half)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def test_structural_passes_are_replayed(tmp_path, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=1)
    passes = [InsertGain(), HalveChosen(), QuantizeRTN(), Lower()]
    compiled = qqq_compile.compile(model, tiny_calib(), passes=passes, progress=False)
    save(compiled, tmp_path / "a")
    x = torch.randint(0, 256, (2, 16))
    mul = torch.ops.aten.mul.Tensor
    for how in ("replay", "graph"):
        back = load(tmp_path / "a", rebuild=how)
        assert torch.equal(back(x).logits, compiled(x).logits)
        assert count(back.graph_module, mul) == count(compiled.graph_module, mul)
    # The same rewrite without a replay declaration cannot be replayed: a clear error, not wrong logits.
    monkeypatch.setattr(InsertGain, "replay_mode", None)
    with pytest.raises(ArtifactError, match="differs from the saved one.*test_artifact_gain.*replay_mode"):
        load(tmp_path / "a", rebuild="replay")
    assert load(tmp_path / "a").rebuilt_by == "graph"  # the saved graph needs no declaration


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    from qqq_compile.compiler.passes.rotate import Rotate
    from qqq_compile.compiler.passes.smooth import Smooth
    from qqq_compile.targets.w4a8.fuse_norm_quant import FuseNormQuant

    model = tiny_model("llama", num_hidden_layers=1)
    passes = [Rotate(), Smooth(), InsertObservers(), Calibrate(), QuantizeRTN(), Lower(), FuseNormQuant()]
    compiled = qqq_compile.compile(model, tiny_calib(), passes=passes, progress=False)
    path = tmp_path_factory.mktemp("rot") / "rot"
    save(compiled, path)
    return compiled, path


@pytest.mark.parametrize("how", ["graph", "replay"])
def test_rotation_smoothing_and_fusion_round_trip_bit_exact(rotated, how):
    compiled, path = rotated
    back = load(path, rebuild=how)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(back(x).logits, compiled(x).logits)

    def online_hadamards(gm):
        return sum(node_annotation(n).online_hadamard is not None for n in gm.graph.nodes)

    assert online_hadamards(back.graph_module) == online_hadamards(compiled.graph_module) > 0
    fused = torch.ops.qqq.rmsnorm_quant.default
    assert count(back.graph_module, fused) == count(compiled.graph_module, fused) == 2
    assert [li.smooth_group for li in back.linears()] == [li.smooth_group for li in compiled.linears()]
    # what the HTML report plots survives the round trip: observed ranges and smoothing records
    for a, b in zip(back.linears(), compiled.linears(), strict=True):
        assert (a.act_absmax is None) == (b.act_absmax is None) and a.act_samples == b.act_samples
        if a.act_absmax is not None:
            assert torch.equal(a.act_absmax, b.act_absmax)

    def smooth_records(gm):
        return [r for n in gm.graph.nodes if (r := node_annotation(n).smooth) is not None]

    saved_recs, loaded_recs = smooth_records(compiled.graph_module), smooth_records(back.graph_module)
    assert len(loaded_recs) == len(saved_recs) > 0
    for a, b in zip(loaded_recs, saved_recs, strict=True):
        assert type(a) is type(b) and (a.group, a.method, a.loss_after) == (b.group, b.method, b.loss_after)
        assert (a.scales is None) == (b.scales is None) and (a.scales is None or torch.equal(a.scales, b.scales))
    assert any(r.scales is not None for r in loaded_recs)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_rtn_round_trip(smollm2, wiki_splits, tmp_path):
    model, tokenizer = smollm2
    calib, evals = wiki_splits
    compiled = qqq_compile.compile(model, calib[:4], {"preset": "rtn"}, progress=False)
    x = evals[0][:, :128]
    with torch.no_grad():
        ref = compiled(x).logits
    save(compiled, tmp_path / "smollm2", tokenizer=tokenizer)
    t0 = time.perf_counter()
    back = load(tmp_path / "smollm2")
    seconds = time.perf_counter() - t0
    assert back.rebuilt_by == "graph", back.rebuild_note  # 3.0-3.3 s measured; capture + replay took 52-58 s
    assert seconds < 20, seconds  # generous: a loaded machine, not a benchmark
    with torch.no_grad():
        out = back(x).logits
    assert torch.equal(out, ref)
    assert count(back.graph_module, W4A8) == 210  # 30 layers x 7 projections; lm_head stays float
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "smollm2", rebuild="replay")(x).logits, ref)  # the fallback
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (tmp_path / "smollm2" / WEIGHTS).stat().st_size < 0.4 * float_bytes


# ----------------------------------------------------------------------------- passes as data, graph file


def every_pass_non_default():
    """One pipeline holding every built-in pass, each with options other than its defaults."""
    from qqq_compile.compiler.passes.cast_float import CastFloatWeights
    from qqq_compile.compiler.passes.gptq import GPTQ
    from qqq_compile.compiler.passes.rotate import Rotate
    from qqq_compile.compiler.passes.smooth import Smooth
    from qqq_compile.targets.w4a8.fuse_norm_quant import FuseNormQuant
    from qqq_compile.targets.w4a8.int8_head import Int8Head

    return [
        Rotate(online_down_proj=False, seed=3, head_rotation=True),
        Smooth(method="qoq_down", alpha=0.6, n_grid=3, max_batches=2, group_size=32, max_tokens=256, patience=2),
        InsertObservers(hessian=True),
        Calibrate(),
        GPTQ(
            damp=0.02,
            block_size=32,
            act_order=False,
            sequential=False,
            group_size=32,
            max_batches=2,
            clip_search=True,
            clip_grid=5,
            clip_min=0.7,
            clip_weighted=False,
            asym=True,
            asym_alpha=0.5,
        ),
        QuantizeRTN(group_size=16, clip_search=True, clip_grid=4, clip_min=0.8),
        Lower(),
        FuseNormQuant(),
        CastFloatWeights("bfloat16"),
        Int8Head(embedding=True),
    ]


@pytest.fixture(scope="module")
def every_pass(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=1)
    compiled = qqq_compile.compile(model, tiny_calib(), passes=every_pass_non_default(), progress=False)
    path = tmp_path_factory.mktemp("every") / "a"
    save(compiled, path)
    return compiled, path


def test_every_registered_pass_saves_and_loads_with_its_options(every_pass):
    from tests.compiler.test_driver import builtin_pass_classes

    compiled, path = every_pass
    passes = every_pass_non_default()
    # A new pass must join this test (the GGUF target's own: tests/targets/gguf/test_target.py).
    assert {p.name for p in passes} == set(builtin_pass_classes("w4a8"))
    for p in passes:
        assert p.options is not None and (p.options == {} or p.config != type(p.config)()), p
    m = json.loads((path / MANIFEST).read_text())
    assert m["pass_configs"] == [p.to_dict() for p in passes]
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = compiled(x).logits
    for how in ("graph", "replay"):
        back = load(path, rebuild=how)
        assert back.rebuilt_by == how
        assert [qqq_compile.pass_from_dict(s) for s in back.report.pass_configs] == passes
        with torch.no_grad():
            assert torch.equal(back(x).logits, ref), how
        for op in (W4A8, torch.ops.qqq.rmsnorm_quant.default, torch.ops.aten._to_copy.default):
            assert count(back.graph_module, op) == count(compiled.graph_module, op), (how, op)


@pytest.mark.parametrize("how", ["graph", "replay"])
def test_rotation_options_survive_the_round_trip(tmp_path, how):
    """Issue #10: Rotate(online_down_proj=False) was replayed as Rotate() and load() failed
    with 'tensors the artifact lacks: [qqq_hadamard_256]'."""
    from qqq_compile.compiler.passes.rotate import Rotate

    model = tiny_model("llama", num_hidden_layers=1)
    passes = [Rotate(online_down_proj=False), QuantizeRTN(), Lower()]
    compiled = qqq_compile.compile(model, tiny_calib(), passes=passes, progress=False)
    save(compiled, tmp_path / "rot")
    back = load(tmp_path / "rot", rebuild=how)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(back(x).logits, compiled(x).logits)
    assert not any("hadamard" in n.target for n in back.graph_module.graph.nodes if n.op == "get_attr")


def test_load_reads_the_graph_file_without_capturing(saved, monkeypatch):
    from qqq_compile.artifact import replay

    compiled, path, x, ref = saved

    def no_capture(*a, **k):
        raise AssertionError("load() captured the model although the graph file is readable")

    monkeypatch.setattr(replay, "capture", no_capture)
    back = load(path)
    assert back.rebuilt_by == "graph" and torch.equal(back(x).logits, ref)
    assert back.source_graph == compiled.source_graph
    # shapes come back (exporters read dtypes and sizes off them): static at the example size, same ranks
    for a, b in zip(compiled.graph_module.graph.nodes, back.graph_module.graph.nodes, strict=True):
        assert a.name == b.name and a.meta.get("nn_module_stack") == b.meta.get("nn_module_stack")
        va, vb = a.meta.get("val"), b.meta.get("val")
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor) and (va.dtype, va.dim()) == (vb.dtype, vb.dim()), a.name
    # a different batch and sequence length still runs (dynamic dims kept)
    assert back(torch.randint(0, 256, (3, 5))).logits.shape == (3, 5, 256)


def test_graph_from_another_torch_release_is_rebuilt_by_replay(saved, copy):
    _, _, x, ref = saved
    m = json.loads((copy / MANIFEST).read_text())
    m["graph_file"]["torch"] = "1.0.0"
    (copy / MANIFEST).write_text(json.dumps(m))
    back = load(copy)
    assert back.rebuilt_by == "replay" and "torch 1.0.0" in back.rebuild_note
    assert torch.equal(back(x).logits, ref)
    with pytest.raises(ArtifactError, match="torch 1.0.0.*rebuild='replay'"):
        load(copy, rebuild="graph")


def test_corrupt_graph_file_fails_the_checksum(copy):
    text = (copy / artifact.GRAPH).read_text()
    edited = text.replace('"aten::mul.Tensor"', '"aten::add.Tensor"', 1)
    assert edited != text
    (copy / artifact.GRAPH).write_text(edited)
    with pytest.raises(ArtifactError, match="graph.json does not match the checksum"):
        load(copy)


def as_format_1_0(path: Path) -> None:
    """Strip what format 1.1 added: the artifact looks as qqq_compile 0.1 wrote it."""
    m = json.loads((path / MANIFEST).read_text())
    for k in ("pass_configs", "graph_file", "source_graph_file"):
        m.pop(k, None)
    m["format_version"] = "1.0"
    m["replay_state"] = {}
    (path / MANIFEST).write_text(json.dumps(m))
    (path / artifact.GRAPH).unlink()
    (path / artifact.SOURCE_GRAPH).unlink()


def test_format_1_0_artifacts_still_load(saved, copy):
    _, _, x, ref = saved
    as_format_1_0(copy)
    back = load(copy)
    assert back.rebuilt_by == "replay" and torch.equal(back(x).logits, ref)
    # Format 1.0 stored no pass configs: the replay ran the preset's and the one the config implies.
    implied = {"name": "int8_head", "options": {"embedding": True}}
    assert back.report.pass_configs == [QuantizeRTN().to_dict(), {"name": "lower", "options": {}}, implied]
    assert back.report.pass_configs[0]["options"]["group_size"] is None


def test_format_1_0_rotated_and_smoothed_artifact_loads_into_the_one_annotation(rotated, tmp_path):
    """Format 1.0 kept smoothing records in its layer list (and the rewrite state under
    gm.meta["qqq_replay"]); replayed, every fact lands in node.meta["qqq"]."""
    compiled, path = rotated
    shutil.copytree(path, tmp_path / "old")
    as_format_1_0(tmp_path / "old")
    back = load(tmp_path / "old")
    x = torch.randint(0, 256, (2, 16))
    assert back.rebuilt_by == "replay" and torch.equal(back(x).logits, compiled(x).logits)
    gm = back.graph_module
    assert not [n.name for n in gm.graph.nodes if set(LEGACY_NODE_KEYS.values()) & set(n.meta)]

    def facts(gm):
        anns = [node_annotation(n) for n in gm.graph.nodes]
        return (
            sorted((a.smooth.group, a.linear.fqn) for a in anns if a.smooth is not None and a.linear is not None),
            sum(a.online_hadamard is not None for a in anns),
            sorted(a.rotate for a in anns if a.rotate),
        )

    assert facts(gm) == facts(compiled.graph_module) and facts(gm)[0] and facts(gm)[1]


def test_format_1_0_with_pass_options_says_how_to_save_again(every_pass, tmp_path):
    shutil.copytree(every_pass[1], tmp_path / "old")
    as_format_1_0(tmp_path / "old")
    with pytest.raises(ArtifactError, match=r"format 1\.0, which stored pass names only.*compile the model again"):
        load(tmp_path / "old")


def test_annotation_codec_round_trips_every_linear(rotated):
    """One codec for the manifest, the graph file and reports: decode(encode(x)) == x."""
    from qqq_compile.annotations import decode_linear, encode_linear

    compiled, _ = rotated
    n_smoothed = 0
    for n in compiled.graph_module.graph.nodes:
        ann = node_annotation(n)
        if ann.linear is None:
            continue
        tensors: dict[str, torch.Tensor] = {}
        rec = json.loads(json.dumps(encode_linear(ann.linear, "k/", tensors, ann.smooth)))
        li, smooth = decode_linear(rec, tensors)
        a, b = vars(li), vars(ann.linear)
        for k in a:
            if k == "hessian":
                continue  # not kept: only GPTQ needs it, while compiling
            if isinstance(b[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            elif k == "packed" and b[k] is not None:
                ta, tb = a[k].tensors(), b[k].tensors()
                assert ta.keys() == tb.keys()
                assert all(
                    (ta[t] is None) == (tb[t] is None) and (ta[t] is None or torch.equal(ta[t], tb[t])) for t in ta
                )
                assert (a[k].group_size, a[k].in_features) == (b[k].group_size, b[k].in_features)
            else:
                assert a[k] == b[k], k
        if ann.smooth is not None:
            n_smoothed += 1
            assert type(smooth) is type(ann.smooth)
            for k, v in vars(ann.smooth).items():
                got = getattr(smooth, k)
                assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v or got != got, k  # nan
    assert n_smoothed > 0
