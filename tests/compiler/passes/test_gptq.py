"""GPTQ pass: capture a tiny model, run ``gptq``, check the packed weights against RTN
on the layer outputs GPTQ minimises, and the error paths."""

from __future__ import annotations

import copy

import pytest
import torch

from qqq_compile import CompileContext, QuantConfig
from qqq_compile.compiler.passes import gptq as gptq_mod
from qqq_compile.compiler.passes.gptq import GPTQ, GPTQError, gptq_quantize
from qqq_compile.graph import get_weight, info, linear_sites
from qqq_compile.targets.w4a8.formats import PackedW4, choose_scales, fake_quant_act
from qqq_compile.targets.w4a8.grid import Grid
from tests.compiler.passes.conftest import HIDDEN

# Hidden 96 is not a multiple of the group size 64: the last group is shorter.
GROUP = 64
FORMATS = [(-1, "int8"), (GROUP, "int8"), (GROUP, "float16")]


def _fresh(captured):
    # Capturing costs seconds; every test gets its own copy of one capture instead.
    return copy.deepcopy(captured)


def _linear_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Inputs ``X`` [n, K] of every nn.Linear of the float model on the calibration data."""
    xs: dict[str, list[torch.Tensor]] = {}
    handles = [
        mod.register_forward_pre_hook(lambda m, a, name=name: xs.setdefault(name, []).append(a[0].detach()))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for k, v in xs.items()}


def _run(gm, batches, gs, dtype, **kw) -> CompileContext:
    ctx = CompileContext(calib=batches, quant=QuantConfig(group_size=gs, group_scale_dtype=dtype), progress=False)
    result = GPTQ(**kw).call(gm, ctx)
    assert result.modified is False  # annotation only
    return ctx


@pytest.mark.parametrize("gs,dtype", FORMATS)
def test_gptq_beats_rtn_on_layer_outputs(model, batches, captured, gs, dtype):
    gm = _fresh(captured)
    _run(gm, batches, gs, dtype, sequential=False)  # float Hessians: exactly the X below
    xs = _linear_inputs(model, batches)
    wins = 0
    quantized = [s for s in linear_sites(gm) if info(s.node).packed is not None]
    assert len(quantized) == 14  # 7 per block, lm_head skipped
    for site in quantized:
        li = info(site.node)
        assert li.method == "gptq" and li.packed.group_size == gs
        assert li.packed.group_scale_dtype == (None if gs < 0 else dtype)
        w = get_weight(gm, site).float()
        x = xs[li.fqn]
        ref = x @ w.t()
        err_gptq = (ref - x @ li.packed.dequantize().t()).norm()
        err_rtn = (ref - x @ PackedW4.from_float(w, gs, dtype).dequantize().t()).norm()
        wins += bool(err_gptq < err_rtn)
        # GPTQ trades weight error for output error, but never by much.
        assert err_gptq < 1.05 * err_rtn, (li.fqn, err_gptq, err_rtn)
        assert li.weight_sqnr_db > 12
    # On the data it minimises, GPTQ's output error is lower than RTN's on every linear.
    assert wins == len(quantized)


@pytest.mark.parametrize("gs,dtype", FORMATS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_core_decodes_exactly_and_beats_rtn(gs, dtype, act_order):
    torch.manual_seed(0)
    n, k = 48, HIDDEN
    # Correlated inputs with uneven channel scales: the case act-order exists for.
    x = torch.randn(512, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k)) * torch.linspace(0.2, 3, k)
    w = torch.randn(n, k)
    h = 2 * x.t() @ x / x.shape[0]
    grid = Grid(w, gs, dtype)
    res = gptq_quantize(w, h, grid, act_order=act_order)
    packed = grid.pack(res.q4)
    # The packed weight decodes bit-exactly to the weight GPTQ propagated errors from.
    assert torch.equal(packed.dequantize(), res.deq)
    if gs < 0 or dtype == "int8":
        # For these formats the grid needs nothing beyond the standard packing.
        ref = PackedW4.from_int4(res.q4, choose_scales(w, gs, dtype), dtype)
        assert torch.equal(ref.qweight, packed.qweight) and torch.allclose(ref.dequantize(), res.deq)
    # ... and so does the W4A8 kernel the lowered graph calls.
    out = torch.ops.qqq.w4a8_linear(x, packed.qweight, packed.channel_scale, packed.group_scale, None, gs)
    torch.testing.assert_close(out, fake_quant_act(x) @ res.deq.t(), rtol=1e-4, atol=1e-3)
    rtn = PackedW4.from_float(w, gs, dtype).dequantize()
    err = lambda wq: ((x @ (w - wq).t()) ** 2).sum().item()  # noqa: E731
    # Act-order matters here: the uneven channel scales are what it exploits.
    assert err(res.deq) < (0.45 if act_order else 0.85) * err(rtn)
    assert res.retries == 0 and res.damp == 0.01 and res.dead == 0


def test_act_order_changes_the_solution_not_the_quality():
    torch.manual_seed(1)
    x = torch.randn(256, 64) * torch.logspace(-1, 1, 64)
    h = 2 * x.t() @ x / 256
    w = torch.randn(16, 64)
    grid = Grid(w, 32, "int8")
    a = gptq_quantize(w, h, grid, act_order=True)
    b = gptq_quantize(w, h, grid, act_order=False)
    assert not torch.equal(a.q4, b.q4)
    err = lambda wq: ((x @ (w - wq).t()) ** 2).sum().item()  # noqa: E731
    assert err(a.deq) < 1.2 * err(b.deq)


def test_dead_inputs_zero_their_columns():
    torch.manual_seed(2)
    x = torch.randn(128, 32)
    x[:, [3, 17]] = 0
    h = 2 * x.t() @ x / 128
    w = torch.randn(8, 32)
    res = gptq_quantize(w, h, Grid(w, -1, "int8"))
    assert res.dead == 2
    assert (res.q4[:, [3, 17]] == 0).all()
    assert (res.q4[:, [0, 5]] != 0).any()


def test_indefinite_hessian_retries_with_more_damping():
    # Mean diag 1 and an eigenvalue of -1: only damping >= 1x mean diag (2 retries:
    # 1% → 10% → 100%; at 100% H is singular, so 1000%) makes H + λI positive definite.
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    w = torch.randn(4, 2)
    res = gptq_quantize(w, h, Grid(w, -1, "int8"))
    assert res.retries >= 2 and res.damp == pytest.approx(0.01 * 10**res.retries)
    with pytest.raises(GPTQError, match="Cholesky failed"):
        gptq_quantize(w, h, Grid(w, -1, "int8"), max_retries=1)
    with pytest.raises(GPTQError, match="NaN"):
        gptq_quantize(w, torch.full((2, 2), float("nan")), Grid(w, -1, "int8"))


def test_cholesky_retry_is_noted_by_the_pass(captured, batches, monkeypatch):
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def flaky(a, *args, **kw):
        # The first factorisation of every Hessian fails, as for a singular H.
        calls["n"] += 1
        lower, err = real(a, *args, **kw)
        return (lower, torch.tensor(1)) if calls["n"] % 3 == 1 else (lower, err)

    monkeypatch.setattr(gptq_mod.torch.linalg, "cholesky_ex", flaky)
    gm = _fresh(captured)
    ctx = _run(gm, batches, -1, "int8", max_batches=1)
    monkeypatch.undo()
    warned = [n for n in ctx.notes if n.pass_name == "gptq" and "Cholesky" in n.message]
    assert warned and all(n.level == "warning" for n in warned)
    assert any("0.1" in n.message for n in warned)
    damps = {info(s.node).gptq["damp"] for s in linear_sites(gm) if info(s.node).gptq}
    assert any(d == pytest.approx(0.1) for d in damps)


def test_skipped_linears_and_float_weights_untouched(model, captured, batches):
    gm = _fresh(captured)
    before = {s.name: get_weight(gm, s).clone() for s in linear_sites(gm)}
    ctx = CompileContext(calib=batches, quant=QuantConfig(skip=("lm_head", "*.down_proj")), progress=False)
    GPTQ(max_batches=1).call(gm, ctx)
    for s in linear_sites(gm):
        li = info(s.node)
        assert torch.equal(get_weight(gm, s), before[s.name])  # annotation only
        if s.name == "lm_head" or s.name.endswith("down_proj"):
            assert li.packed is None and li.method is None and li.skipped
        else:
            assert li.method == "gptq"
    # The graph still computes the float model.
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids)[0], model(input_ids=ids).logits)


def test_sequential_uses_quantized_inputs(captured, batches):
    packs = {}
    for seq in (True, False):
        gm = _fresh(captured)
        _run(gm, batches, -1, "int8", sequential=seq, max_batches=1)
        packs[seq] = {s.name: info(s.node).packed for s in linear_sites(gm) if info(s.node).packed}
    first = [k for k in packs[True] if ".layers.0.self_attn." in k and k[-6:] in ("q_proj", "k_proj", "v_proj")]
    later = [k for k in packs[True] if k not in first]
    assert len(first) == 3 and len(later) == 11
    # q/k/v of block 0 read the embeddings either way. Everything after them reads
    # inputs computed with the quantized linears before it only when sequential
    # (o_proj included: "true sequential" within the block).
    assert all(torch.equal(packs[True][k].qweight, packs[False][k].qweight) for k in first)
    changed = [k for k in later if not torch.equal(packs[True][k].qweight, packs[False][k].qweight)]
    assert "model.layers.0.self_attn.o_proj" in changed and len(changed) >= 9


def test_bad_options_are_rejected(captured, batches):
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)
    gm = _fresh(captured)
    ctx = CompileContext(calib=batches, quant=QuantConfig(group_size=GROUP), progress=False)
    with pytest.raises(ValueError, match="static_groups"):
        GPTQ(static_groups=False).call(gm, ctx)
    with pytest.raises(ValueError, match="calibration"):
        GPTQ().call(gm, CompileContext(progress=False))


@pytest.mark.slow
def test_gptq_on_smollm2_keeps_perplexity(smollm2, wiki_splits):
    """The real model: GPTQ W4A8 per-channel on 8 calibration windows, lowered to the
    W4A8 ops, perplexity on the first 8 of the standard evaluation windows (BOS + 511;
    see data.standard_splits), against FP32 and RTN on the same windows."""
    import qqq_compile as qc
    from qqq_compile.eval import perplexity

    model, _ = smollm2
    calib, evals = wiki_splits
    evals = evals[:8]
    fp = perplexity(model, evals, progress=False)
    ppl = {}
    for preset in ("rtn", "gptq"):
        cm = qc.compile(model, calib[:8], {"preset": preset, "quant": {"group_size": -1}}, progress=False)
        assert sum(li.lowered for li in cm.linears()) == 210  # 30 blocks x 7; lm_head float
        ppl[preset] = perplexity(cm, evals, progress=False)
    # Measured on 2 busy cores (28 min): FP 18.99, RTN 40.38, GPTQ 35.65 (per-channel W4A8
    # without smoothing; the GGUF Q4_1 origin understates weight error). Re-measured in round
    # 17 (`/tmp/p17/ppl8.py`): RTN 40.49, GPTQ 36.34 with torch's bf16 Hessian sums and 36.45
    # with the C++ kernel's fp32 sums (H 100x closer to exact; GPTQ's rounding moves by
    # ±0.3-1% with any change of H: the rotated preset went 22.18 -> 21.95 in the same run).
    # Floors: the measured values with 2% for thread-count (float summation order) noise.
    assert fp == pytest.approx(18.99, rel=0.005), fp
    assert ppl["rtn"] == pytest.approx(40.38, rel=0.02), ppl
    assert ppl["gptq"] < 36.45 * 1.02, (fp, ppl)
    assert ppl["gptq"] < ppl["rtn"] - 0.12 * (ppl["rtn"] - fp), (fp, ppl)
