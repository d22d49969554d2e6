"""Bad input catalogue: every case ends in a working model or an error that names the
problem and the fix, and the user's model is never modified.

Artifact damage (missing folder or manifest, foreign format, invalid JSON, newer major
version, truncated or corrupt weights, missing tensor, shape mismatches, a save killed
halfway) is covered in ``tests/test_artifact.py``; only the cases it lacks are here.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qqq_compile as qc
from qqq_compile import artifact
from qqq_compile.artifact import MANIFEST, WEIGHTS, ArtifactError, load, save
from qqq_compile.compiler.api import check_calib
from qqq_compile.compiler.pipeline import FunctionPass, PipelineError, sqnr_db
from qqq_compile.graph import get_weight, linear_sites, set_weight
from qqq_compile.inspect import summary
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default
CALIBRATE = {"preset": "rtn", "preset_options": {"calibrate": True}}


def count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} was modified")


def logits_sqnr(model: nn.Module, compiled: nn.Module, vocab: int = 256) -> float:
    x = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    ref, out = getattr(ref, "logits", ref), getattr(out, "logits", out)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return sqnr_db(ref, out)


def llama(**kw) -> nn.Module:
    return tiny_model("llama", num_hidden_layers=1, **kw)


# ----------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize("preset,where", [(CALIBRATE, "'calibrate'"), ({"preset": "gptq"}, "'gptq'")])
def test_nan_activations_name_the_linear_and_the_data(preset, where):
    model = llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")  # any window holding token 5 poisons its row
    before = snapshot(model)
    calib = tiny_calib(4)
    calib[0][0, 3] = 5
    with pytest.raises(PipelineError, match=where) as err:
        qc.compile(model, calib, preset, progress=False)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and ("NaN or Inf" in msg or "NaN/Inf" in msg)
    assert "check the calibration data" in msg.lower()
    assert_unchanged(model, before)


def test_fp16_overflow_during_calibration_says_so():
    model = llama()
    with torch.no_grad():  # gate * up overflows fp16 (> 65504) in front of down_proj
        model.model.layers[0].mlp.gate_proj.weight.mul_(1000)
        model.model.layers[0].mlp.up_proj.weight.mul_(1000)
    model = model.half()
    with pytest.raises(PipelineError, match="down_proj contains NaN or Inf.*fp16 overflows are common"):
        qc.compile(model, tiny_calib(4), CALIBRATE, progress=False)


def test_float_calibration_tensors_are_refused_before_capture(monkeypatch):
    monkeypatch.setattr("qqq_compile.compiler.api.capture", lambda *a, **k: pytest.fail("capture ran"))
    with pytest.raises(TypeError, match="must hold integer token ids, got a floating-point tensor"):
        qc.compile(llama(), [torch.full((1, 16), float("nan"))], progress=False)


@pytest.mark.parametrize(
    "calib", [[], torch.zeros(0, 16, dtype=torch.long), [torch.zeros(1, 0, dtype=torch.long)]], ids=str
)
def test_empty_calibration(calib):
    with pytest.raises(ValueError, match=r"calibration data is empty: give at least one window of token ids"):
        qc.compile(llama(), calib, progress=False)


def test_missing_calibration_for_a_calibrating_preset():
    model = llama()
    before = snapshot(model)
    with pytest.raises(PipelineError, match="'smooth' needs calibration data.*pass calib=..."):
        qc.compile(model, None, {"preset": "qqq"}, progress=False)
    assert_unchanged(model, before)


def test_one_token_windows_are_refused():
    with pytest.raises(ValueError, match="calibration window of 1 token: windows need at least 2 tokens"):
        qc.compile(llama(), torch.randint(0, 256, (8, 1)), progress=False)


def test_little_calibration_warns():
    with pytest.warns(UserWarning, match=r"only 64 tokens, fewer than 256 \(the least for usable activation"):
        compiled = qc.compile(llama(), tiny_calib(2), CALIBRATE, progress=False)
    assert count(compiled.graph_module, W4A8) == 7  # a warning, not an error
    wide = llama(intermediate_size=640)  # down_proj reads 640 inputs
    with pytest.warns(UserWarning, match="fewer than 640 .the 640 inputs of the widest linear: its GPTQ Hessian"):
        check_calib(wide, qc.calib_batches(tiny_calib(16)))  # 512 tokens


@pytest.mark.parametrize("bad,shown", [(300, "300"), (-1, "-1")])
def test_token_ids_outside_the_vocabulary(bad, shown):
    calib = tiny_calib(4)
    calib[2][0, 7] = bad
    with pytest.raises(ValueError, match=rf"token id {shown} is out of range: the model's vocabulary has 256 entries "):
        qc.compile(llama(), calib, progress=False)


# ----------------------------------------------------------------------------- shapes


class Mix(nn.Module):
    """A weight used through einsum (lowered to bmm): no pass matches it."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btk,nk->btn", x, self.w)


class Odd(nn.Module):
    """Layers the compiler does not rewrite (embedding, Conv2d, einsum) and tiny linears."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.mix = Mix(d)
        self.fc = nn.Linear(d, d)
        self.k2 = nn.Linear(2, d)  # K = 2
        self.n1 = nn.Linear(d, 1)  # N = 1
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.conv(h.unsqueeze(1)).squeeze(1)
        h = h + self.mix(h)
        h = h + self.fc(h)
        h = h + self.k2(h[..., :2]) + self.n1(h)
        return self.head(h)


@pytest.mark.parametrize(
    "overrides,group",
    [
        ({"hidden_size": 96}, 128),  # K = 96 < group 128
        ({"hidden_size": 96}, 64),  # K = 96 not a multiple of 64
        ({"intermediate_size": 10}, 32),  # N = 10 and down_proj K = 10
    ],
    ids=["K96-g128", "K96-g64", "N10-g32"],
)
def test_dims_that_do_not_divide_the_group(overrides, group):
    model = llama(**overrides)
    compiled = qc.compile(model, tiny_calib(), {"quant": {"group_size": group}}, progress=False)
    assert count(compiled.graph_module, W4A8) == 7
    assert logits_sqnr(model, compiled) > 15


@pytest.mark.parametrize("group", [-1, 32])
def test_tiny_and_unsupported_layers_stay_listed(group):
    torch.manual_seed(0)
    model = Odd().eval()
    before = snapshot(model)
    compiled = qc.compile(model, tiny_calib(8, vocab=64), {"quant": {"group_size": group, "skip": []}}, progress=False)
    rows = {r["name"]: r for r in summary(compiled)}
    assert {n: (r["in_features"], r["out_features"], r["lowered"]) for n, r in rows.items()} == {
        "fc": (32, 32, True),
        "k2": (2, 32, True),
        "n1": (32, 1, True),
        "head": (32, 64, True),
    }
    (note,) = [n.message for n in compiled.report.notes if n.pass_name == "compile"]
    assert note == (
        "weights kept in float (no quantized rewrite for their ops): embed.weight [64, 32] (embedding); "
        "conv.weight [1, 1, 3, 3] (convolution); mix.w [32, 32] (bmm)"
    )
    ops = {n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.convolution.default, torch.ops.aten.bmm.default} <= ops  # never dropped
    assert logits_sqnr(model, compiled, vocab=64) > 15
    assert_unchanged(model, before)


def test_tied_lm_head_quantized_when_not_skipped():
    model = llama(tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compiled = qc.compile(model, tiny_calib(), {"quant": {"skip": []}}, progress=False)
    assert [li.fqn for li in compiled.linears() if li.lowered][-1] == "lm_head"
    assert count(compiled.graph_module, W4A8) == 8
    emb = [n for n in compiled.graph_module.graph.nodes if n.target == torch.ops.aten.embedding.default]
    assert len(emb) == 1  # the embedding still reads the float table
    assert logits_sqnr(model, compiled) > 12
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch,biased", [("qwen2", 3), ("opt", 6)])
def test_biases_reach_the_kernel(arch, biased):
    model = tiny_model(arch, num_hidden_layers=1)
    compiled = qc.compile(model, tiny_calib(), progress=False)
    nodes = [n for n in compiled.graph_module.graph.nodes if n.target == W4A8]
    assert sum(1 for n in nodes if n.args[4] is not None) == biased
    assert logits_sqnr(model, compiled) > 15


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "dtype,preset",
    [
        (torch.float32, CALIBRATE),
        (torch.float16, CALIBRATE),
        (torch.bfloat16, CALIBRATE),
        (torch.float16, {"preset": "gptq"}),
        (torch.bfloat16, {"preset": "gptq"}),
        (torch.float32, {"preset": "qqq"}),
        (torch.float16, {"preset": "qqq"}),
        (torch.bfloat16, {"preset": "qqq"}),
    ],
    ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v["preset"],
)
def test_dtypes_match_the_same_dtype_float_model(dtype, preset):
    model = llama().to(dtype)
    before = snapshot(model)
    compiled = qc.compile(model, tiny_calib(), preset, progress=False)
    assert count(compiled.graph_module, W4A8) == 7
    assert logits_sqnr(model, compiled) > 18  # measured 21-23 dB in all three dtypes
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- failures mid-way


def test_failed_pass_names_itself_keeps_the_model_and_the_dumps(tmp_path):
    model = llama()
    before = snapshot(model)

    def zero_weights_then_fail(gm, ctx):
        for site in linear_sites(gm):
            set_weight(gm, site, torch.zeros_like(get_weight(gm, site)))  # replaced, never written in place
        raise RuntimeError("out of ideas")

    passes = qc.get_preset("rtn", calibrate=True)
    passes.insert(2, FunctionPass(zero_weights_then_fail, "explode"))
    with pytest.raises(PipelineError, match=r"pass #2 'explode' failed \(passes run before it: observe, calibrate\)"):
        qc.compile(model, tiny_calib(), passes=passes, dump_dir=tmp_path, progress=False)
    assert_unchanged(model, before)
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["00_input.txt", "01_observe.txt", "02_calibrate.txt"]


def test_keyboard_interrupt_in_a_pass_is_not_swallowed():
    model = llama()
    before = snapshot(model)

    def interrupted(gm, ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qc.compile(model, tiny_calib(), passes=[FunctionPass(interrupted)], progress=False)
    assert_unchanged(model, before)


@pytest.fixture(scope="module")
def compiled_tiny():
    return qc.compile(llama(), tiny_calib(), {"quant": {"group_size": 32}}, progress=False)


@pytest.mark.parametrize("existing", [False, True])
def test_keyboard_interrupt_during_save_leaves_no_half_artifact(compiled_tiny, tmp_path, monkeypatch, existing):
    target = tmp_path / "art"
    if existing:
        save(compiled_tiny, target)
        old = {p.name: p.read_bytes() for p in target.iterdir()}

    def interrupted_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # half a file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact.files, "save_file", interrupted_writer)
    with pytest.raises(KeyboardInterrupt):
        save(compiled_tiny, target)
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == old
        load(target)  # still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == (["art"] if existing else [])


# ----------------------------------------------------------------------------- artifacts (beyond test_artifact.py)


@pytest.fixture
def saved(compiled_tiny, tmp_path):
    return save(compiled_tiny, tmp_path / "art")


def test_missing_weights_file(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is missing; the artifact is incomplete, save it again"):
        load(saved)


def test_half_written_manifest(saved):
    text = (saved / MANIFEST).read_text()
    (saved / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=f"{MANIFEST} is not valid JSON .*corrupt, save it again"):
        load(saved)


def test_manifest_without_required_fields(saved):
    m = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps({k: m[k] for k in ("format", "format_version")}))
    with pytest.raises(ArtifactError, match=r"lacks the field\(s\) \['model_class'.*save it again"):
        load(saved)


# ----------------------------------------------------------------------------- determinism


def test_qqq_preset_artifacts_are_byte_identical(tmp_path):
    """Same model, data and seed: smoothing + GPTQ give the same bytes twice."""
    assert [p.name for p in qc.get_preset("qqq")] == ["smooth", "gptq", "quantize_rtn", "lower"]
    files = []
    for run in range(2):
        torch.manual_seed(1234 + run)  # global RNG state must not matter
        compiled = qc.compile(llama(), tiny_calib(), {"preset": "qqq", "quant": {"group_size": 32}}, progress=False)
        path = save(compiled, tmp_path / f"run{run}")
        files.append({p.name: p.read_bytes() for p in path.iterdir()})
    assert files[0].keys() == files[1].keys() == {MANIFEST, WEIGHTS, artifact.GRAPH, artifact.SOURCE_GRAPH}
    assert [k for k in files[0] if files[0][k] != files[1][k]] == []
    other = qc.compile(llama(seed=1), tiny_calib(), {"preset": "qqq", "quant": {"group_size": 32}}, progress=False)
    save(other, tmp_path / "other")
    assert (tmp_path / "other" / WEIGHTS).read_bytes() != files[0][WEIGHTS]  # the check can tell models apart


def test_outputs_keep_no_autograd_graph(compiled_tiny):
    """A call outside ``torch.no_grad()`` (what users write first) records no autograd graph:
    the compiled model is for inference and its float weights are frozen."""
    out = compiled_tiny(torch.randint(0, 256, (1, 8))).logits
    assert out.grad_fn is None and not out.requires_grad
    assert not any(p.requires_grad for p in compiled_tiny.parameters())
