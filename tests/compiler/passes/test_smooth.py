"""smooth: groups read off the graph, float equivalence, lower W4A8 error, unsafe folds."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qqq_compile import CompileContext
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.api import calib_batches
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.smooth import Smooth, fold_scales, run_w4a8_fake, smoothing_groups
from qqq_compile.compiler.pipeline import first_tensor, sqnr_db
from qqq_compile.graph import get_attr, get_weight, info, linear_sites
from tests.conftest import tiny_calib, tiny_model

CH = [3, 17, 40]  # channels given outliers


def add_outliers(model: torch.nn.Module, factor: float = 30.0, compensate: bool = False) -> torch.nn.Module:
    """Scale a few channels of every norm weight by ``factor`` (the activations feeding
    q/k/v and gate/up get outlier channels). With ``compensate`` the linears reading a
    norm get those input columns divided by ``factor``: the float model is unchanged,
    only its activations are harder to quantize (SmoothQuant's setting)."""
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if "norm" not in type(mod).__name__.lower() or w is None or w.dim() != 1:
                continue
            if "Gemma" in type(mod).__name__:  # Gemma scales by (1 + w)
                w[CH] = (1 + w[CH]) * factor - 1
            else:
                w[CH] *= factor
            b = getattr(mod, "bias", None)
            if b is not None:  # make LayerNorm's bias non-trivial so its fold is tested
                b.copy_(torch.randn_like(b) * 0.1)
        if compensate:
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and any(
                    k in name for k in ("q_proj", "k_proj", "v_proj", "gate", "up")
                ):
                    mod.weight[:, CH] /= factor
    return model


@functools.cache
def _captured(arch: str, outliers: bool) -> torch.fx.GraphModule:
    model = tiny_model(arch)
    if outliers:
        add_outliers(model, compensate=True)
    return capture(model, torch.randint(0, 256, (2, 8))).graph_module


def graph(arch: str, outliers: bool = True) -> torch.fx.GraphModule:
    """A fresh copy of the captured tiny model (captured once per session)."""
    return copy.deepcopy(_captured(arch, outliers))


CALIB = calib_batches(tiny_calib(8, 32))
EVAL = {"input_ids": torch.cat(tiny_calib(8, 32, seed=1))}


def layer0(names):
    return {n for n in names if ".0." in n}


EXPECTED = {
    "llama": {
        "model.layers.0.input_layernorm→q_proj,k_proj,v_proj",
        "model.layers.0.post_attention_layernorm→gate_proj,up_proj",
        "model.layers.0.mlp.up_proj→down_proj",
    },
    "llama_mha": {
        "model.layers.0.input_layernorm→q_proj,k_proj,v_proj",
        "model.layers.0.self_attn.v_proj→o_proj",
        "model.layers.0.post_attention_layernorm→gate_proj,up_proj",
        "model.layers.0.mlp.up_proj→down_proj",
    },
    "qwen2": {
        "model.layers.0.input_layernorm→q_proj,k_proj,v_proj",
        "model.layers.0.post_attention_layernorm→gate_proj,up_proj",
        "model.layers.0.mlp.up_proj→down_proj",
    },
    "gemma": {
        "model.layers.0.input_layernorm→q_proj,k_proj,v_proj",
        "model.layers.0.post_attention_layernorm→gate_proj,up_proj",
        "model.layers.0.mlp.up_proj→down_proj",
    },
    "opt": {
        "model.decoder.layers.0.self_attn_layer_norm→q_proj,k_proj,v_proj",
        "model.decoder.layers.0.self_attn.v_proj→out_proj",
        "model.decoder.layers.0.final_layer_norm→fc1",
    },
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_groups_are_read_off_the_graph(arch):
    groups = smoothing_groups(graph(arch, outliers=False))
    assert layer0(g.name for g in groups) == EXPECTED[arch]
    assert all(g.unsafe is None for g in groups if ".0." in g.name)
    for g in groups:
        assert (g.norm is not None) == ("norm→" in g.name)  # norm groups vs linear→linear pairs
    # GQA: v_proj's channels are shared by several heads, so v→o must not be a pair.
    has_vo = any(("v_proj→o" in g.name or "v_proj→out" in g.name) for g in groups)
    assert has_vo == (arch in ("llama_mha", "opt"))


@pytest.mark.parametrize("arch", ["llama", "llama_mha", "qwen2", "gemma", "opt"])
def test_smoothed_float_model_is_unchanged_and_scales_are_real(arch):
    gm = graph(arch)
    ref = first_tensor(gm(**EVAL)).detach()
    res = Smooth(n_grid=6)(gm, CompileContext(calib=CALIB, progress=False))
    assert res.modified
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 60
    smoothed = {}
    for s in linear_sites(gm):
        rec = node_annotation(s.node).smooth
        if rec is not None and rec.skipped is None and rec.param is not None:
            smoothed[rec.group] = rec
            assert info(s.node).smooth_group == rec.group
            lo, hi = info(s.node).smooth_scale_range
            assert lo == pytest.approx(rec.scales.min().item()) and hi == pytest.approx(rec.scales.max().item())
            assert torch.allclose(rec.act_absmax_after, rec.act_absmax_before / rec.scales)
            assert rec.loss_after < rec.loss_before
    # The outlier channels of the norm groups get scales well away from 1.
    norm_recs = [r for name, r in smoothed.items() if "norm→" in name]
    assert norm_recs and all(r.scales.max() > 1.5 for r in norm_recs)
    assert any(r.scales[CH].min() > 1.5 for r in norm_recs)


@pytest.mark.parametrize("method", ["qqq", "smoothquant", "awq"])
def test_smoothing_lowers_w4a8_error_on_a_model_with_outliers(method):
    gm = graph("llama_mha")
    ref = first_tensor(gm(**EVAL)).detach()
    before = sqnr_db(ref, first_tensor(run_w4a8_fake(gm, EVAL)))
    Smooth(method, n_grid=8)(gm, CompileContext(calib=CALIB, progress=False))
    after = sqnr_db(ref, first_tensor(run_w4a8_fake(gm, EVAL)))
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 60
    assert after > before + 2.0, (before, after)  # measured: about +5 dB for every method


def test_no_candidate_is_kept_unless_it_beats_no_smoothing():
    gm = graph("llama", outliers=False)
    Smooth(n_grid=4, patience=None)(gm, CompileContext(calib=CALIB, progress=False))
    recs = [r for s in linear_sites(gm) if (r := node_annotation(s.node).smooth) is not None]
    for rec in recs:
        if rec.skipped is None:
            assert rec.n_tried == 4  # without patience the whole grid is scored
            assert rec.loss_after <= rec.loss_before
            if rec.param is None:  # s = 1 won: nothing folded, nothing annotated
                assert torch.equal(rec.scales, torch.ones_like(rec.scales))


def test_tied_linear_and_shared_norm_are_skipped_and_noted():
    model = tiny_model("llama")
    l0, l1 = model.model.layers
    l1.mlp.up_proj.weight = l0.mlp.up_proj.weight  # tied linear
    l1.input_layernorm.weight = l0.input_layernorm.weight  # one norm weight for two norms
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(calib=CALIB, progress=False)
    before = {n: t.clone() for n, t in gm.named_parameters()}
    Smooth(n_grid=4)(gm, ctx)
    unsafe = {g.name: g.unsafe for g in smoothing_groups(gm) if g.unsafe}
    for layer in (0, 1):
        assert "tied" in unsafe[f"model.layers.{layer}.post_attention_layernorm→gate_proj,up_proj"]
        assert "tied" in unsafe[f"model.layers.{layer}.mlp.up_proj→down_proj"]
        assert "shared" in unsafe[f"model.layers.{layer}.input_layernorm→q_proj,k_proj,v_proj"]
    noted = " ".join(n.message for n in ctx.notes if n.pass_name == "smooth")
    assert "tied" in noted and "shared" in noted
    for s in linear_sites(gm):
        if s.name.startswith("model.layers") and not s.name.endswith("o_proj"):  # o_proj: no group under GQA
            assert info(s.node).smooth_group is None
            assert node_annotation(s.node).smooth.skipped
    after = dict(gm.named_parameters())
    for name in before:
        assert torch.equal(before[name], after[name]), name  # nothing unsafe was folded


class _NormEverywhere(torch.nn.Module):
    """Decoder blocks whose norm output also joins the residual (a non-linear consumer)."""

    def __init__(self, d=32, n=2):
        super().__init__()
        self.embed = torch.nn.Embedding(64, d)
        self.layers = torch.nn.ModuleList(_Block(d) for _ in range(n))
        self.head = torch.nn.Linear(d, 64)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm_w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        return x + h + self.fc2(torch.relu(self.fc1(h)))


def test_norm_feeding_a_non_linear_is_not_folded():
    gm = capture(_NormEverywhere(), {"input_ids": torch.randint(0, 64, (2, 8))}).graph_module
    ctx = CompileContext(calib=calib_batches(torch.randint(0, 64, (4, 16))), progress=False)
    w0 = get_attr(gm, "layers.0.norm_w").clone()
    res = Smooth(n_grid=4)(gm, ctx)
    assert not res.modified and torch.equal(get_attr(gm, "layers.0.norm_w"), w0)
    g = next(g for g in smoothing_groups(gm) if g.name.startswith("layers.0"))
    assert "not a linear" in g.unsafe
    assert any("layers.0" in n.message and "not a linear" in n.message for n in ctx.notes)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="qqq"):
        Smooth(method="bogus")


@settings(max_examples=20, deadline=None)
@given(
    arch=st.sampled_from(["llama_mha", "gemma", "opt"]),
    seed=st.integers(0, 2**16),
    spread=st.floats(0.0, math.log(50.0)),
)
def test_any_folded_scales_keep_the_float_model(arch, seed, spread):
    gm = graph(arch, outliers=False)
    ref = first_tensor(gm(**EVAL)).detach()
    g = torch.Generator().manual_seed(seed)
    for grp in smoothing_groups(gm):
        if grp.unsafe is None:
            k = get_weight(gm, grp.linears[0]).shape[1]
            fold_scales(gm, grp, torch.exp((torch.rand(k, generator=g) * 2 - 1) * spread))
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 60


@pytest.mark.slow
def test_smollm2_groups_and_float_equivalence(smollm2, wiki_splits):
    model, _ = smollm2
    calib, evalw = wiki_splits
    gm = capture(model, torch.randint(0, 1000, (2, 16))).graph_module
    groups = smoothing_groups(gm)
    inner = [g for g in groups if ".layers." in g.name]
    assert len(inner) == 90 and not any("v_proj→o_proj" in g.name for g in groups)  # GQA: no v→o
    x = {"input_ids": evalw[0]}
    ref = first_tensor(gm(**x)).detach()
    ctx = CompileContext(calib=calib_batches(calib), progress=False)
    assert Smooth()(gm, ctx).modified
    assert sqnr_db(ref, first_tensor(gm(**x))) > 60
    smoothed = [s for s in linear_sites(gm) if info(s.node) is not None and info(s.node).smooth_group]
    assert len(smoothed) > 150  # of 180 (q/k/v, gate/up, down in 30 layers); measured 87 of 90 groups


# ----------------------------------------------------------------------------- any module


def ln_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.LayerNorm(64), torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)
    ).eval()
    with torch.no_grad():
        mlp[0].bias.normal_(0, 0.5)
        mlp[0].weight[:3] *= 20
    return mlp


def test_layernorm_bias_absorbs_the_scale_too():
    mlp = ln_mlp()
    gm = capture(mlp, (torch.randn(4, 64),)).graph_module
    (g,) = [g for g in smoothing_groups(gm) if g.norm is not None]
    assert g.norm.kind == "layernorm" and g.norm.bias is not None and g.unsafe is None
    w, b = get_attr(gm, g.norm.weight.target).clone(), get_attr(gm, g.norm.bias.target).clone()
    x = torch.randn(16, 64)
    s = torch.rand(64) * 3 + 0.5
    with torch.no_grad():
        ref = gm(input=x)
        fold_scales(gm, g, s)
        torch.testing.assert_close(gm(input=x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(get_attr(gm, g.norm.weight.target), w / s)
    torch.testing.assert_close(get_attr(gm, g.norm.bias.target), b / s)


def test_module_without_blocks_is_smoothed_and_the_gelu_explained():
    mlp = ln_mlp()
    gm = capture(mlp, (torch.randn(4, 64),)).graph_module
    calib = calib_batches([torch.randn(32, 64) for _ in range(2)], model=mlp)
    ctx = CompileContext(calib=[{"input": b[0]} for b in calib], progress=False)
    x = torch.randn(64, 64)
    with torch.no_grad():
        ref = gm(input=x)
        before = sqnr_db(ref, first_tensor(run_w4a8_fake(gm, {"input": x})))
        assert Smooth(n_grid=8)(gm, ctx).modified
        torch.testing.assert_close(gm(input=x), ref, rtol=1e-4, atol=1e-4)  # float-equivalent
        after = sqnr_db(ref, first_tensor(run_w4a8_fake(gm, {"input": x})))
    assert after > before + 0.5, (before, after)  # measured 19.8 -> 20.7 dB
    (note,) = [n.message for n in ctx.notes if "no smoothing pattern" in n.message]
    assert "3: its producer 1 does not qualify" in note and "gelu" in note


def test_windows_for_float_inputs_take_rows_from_every_batch():
    gm = capture(ln_mlp(), (torch.randn(4, 64),)).graph_module
    batches = [{"input": torch.full((8, 64), float(i))} for i in range(3)]
    wins = Smooth(max_tokens=4, max_batches=2)._windows(gm, batches)
    rows = torch.cat([w["input"] for w in wins])
    assert rows.shape == (4, 64) and set(rows[:, 0].tolist()) == {0.0, 1.0}
