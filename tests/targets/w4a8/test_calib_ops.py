"""The W4A8 target's kernels in GPTQ's calibration forwards (``Target.calib_ops``): attention
on ``attention_prefill`` and the rotate pass's online Hadamard chain on ``kron_transform``,
in the quantized run and in GPTAQ's float run alike."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
import qqq_compile.targets.w4a8.calib_ops as calib_ops_mod
from qqq_compile.compiler.block_runner import BlockRunner
from qqq_compile.compiler.calibration import calib_batches, example_call
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.driver import build_passes, run_pipeline
from qqq_compile.compiler.pipeline import CompileContext, sqnr_db
from qqq_compile.config import CompileConfig
from qqq_compile.targets.registry import get_target
from qqq_compile.targets.w4a8.kernels.cpu import cpp_path_counts, cpu_supports_kernels, ensure_cpp_kernels
from qqq_compile.targets.w4a8.target import W4A8
from tests.conftest import tiny_calib, tiny_model

pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="this CPU lacks AVX512-VNNI/VBMI")

aten = torch.ops.aten
CONFIG = {"preset": "qqq_rot"}


@pytest.fixture(autouse=True)
def _kernels_active():
    assert ensure_cpp_kernels(), "the C++ kernels did not load (see the warning), or QQQ_CPU_KERNEL=torch is set"


def _model():
    # MLP 384 = 12·32: an online Hadamard chain (mm + bmm) before each down_proj; 4 heads over
    # 2 KV heads.
    return tiny_model("llama", intermediate_size=384, num_key_value_heads=2)


@pytest.fixture(scope="module")
def rotated():
    """The tiny model's graph after the passes before ``gptq`` (rotation), and its batches."""
    model = _model()
    config = CompileConfig.from_dict(CONFIG)
    batches = calib_batches(tiny_calib(8, 48), None, 4, None)
    captured = capture(model, example_call(batches))
    calib = [captured.graph_inputs(b) for b in batches]
    ctx = CompileContext(calib=calib, quant=config.quant, progress=False)
    passes = build_passes(config)
    i = [p.name for p in passes].index("gptq")
    gm, _ = run_pipeline(captured.graph_module, ctx, passes[:i], config=config)
    return gm, calib


def test_a_block_with_the_kernels_equals_the_graphs_ops(rotated):
    gm, calib = rotated
    state = next(BlockRunner(gm, calib, progress=False).blocks())
    nodes = state.block.nodes
    ops = get_target("w4a8").calib_ops(gm, nodes)
    sdpas = [n for n in nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpas) == 1 and sdpas[0] in ops
    chain = {n for n in ops if n.target in (aten.mm.default, aten.bmm.default)}
    assert {n.target for n in chain} == {aten.mm.default, aten.bmm.default}  # the whole chain
    last = nodes[-1]
    before = cpp_path_counts()
    got = state.run(overrides=ops, outputs=[last])
    after = cpp_path_counts()
    want = state.run(outputs=[last])
    assert after["attention_prefill"] == before["attention_prefill"] + len(calib)
    assert after["kron_transform"] == before["kron_transform"] + len(calib)
    for (w,), (g,) in zip(want, got, strict=True):
        assert sqnr_db(w, g) > 100  # float rounding only


def test_gptq_runs_the_kernels_in_both_runs_and_quantizes_alike(monkeypatch):
    model, calib = _model(), tiny_calib(8, 48)
    layers = model.config.num_hidden_layers
    before = cpp_path_counts()
    fast = qc.compile(model, calib=calib, config=qc.CompileConfig.from_dict(CONFIG), progress=False)
    after = cpp_path_counts()
    # Per block and batch: the quantized run and GPTAQ's float run (8 windows of 48 tokens
    # make one batch at this size, more with smaller batches: at least one each).
    assert after["attention_prefill"] - before["attention_prefill"] >= 2 * layers
    assert after["kron_transform"] - before["kron_transform"] >= 2 * layers
    monkeypatch.setattr(W4A8, "calib_ops", lambda self, gm, nodes: {})
    plain = qc.compile(model, calib=calib, config=qc.CompileConfig.from_dict(CONFIG), progress=False)
    ids = tiny_calib(2, 40, seed=9)[0]
    with torch.no_grad():
        a, b, f = fast(ids).logits, plain(ids).logits, model(ids).logits
    # Float rounding that flips a few int4/int8 roundings, not a different quantization
    # (measured 28.9 dB between the two; 22.1 and 21.8 dB each against the float model).
    assert sqnr_db(b, a) > 25
    assert sqnr_db(f, a) > sqnr_db(f, b) - 1


def test_no_kernels_no_overrides(rotated, monkeypatch):
    gm, _ = rotated
    monkeypatch.setattr(calib_ops_mod, "ensure_cpp_kernels", lambda: False)
    assert calib_ops_mod.calib_ops(gm, list(gm.graph.nodes)) == {}


def test_the_sdpa_override_keeps_sdpa_where_the_kernel_does_not_apply():
    """A float mask, bf16 inputs or a single query token run the node's own SDPA."""
    g = torch.fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    node = g.call_function(aten.scaled_dot_product_attention.default, (q, k, v, m), {"scale": 0.5})
    run = calib_ops_mod.sdpa_override(node)
    assert run is not None
    assert calib_ops_mod.sdpa_override(g.call_function(aten.scaled_dot_product_attention.default, (q, k, v))) is None
    x = torch.randn(1, 2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    for args in (
        (x, x, x, torch.zeros(1, 1, 6, 6).masked_fill(~causal, float("-inf"))),
        (x.bfloat16(), x.bfloat16(), x.bfloat16(), causal),
        (x[:, :, :1], x, x, causal[:, :, :1]),
    ):
        before = cpp_path_counts()["attention_prefill"]
        got = run(*args, scale=0.5)
        assert cpp_path_counts()["attention_prefill"] == before
        torch.testing.assert_close(got, aten.scaled_dot_product_attention.default(*args, scale=0.5))
    before = cpp_path_counts()["attention_prefill"]
    got = run(x, x, x, causal, scale=0.5)
    assert cpp_path_counts()["attention_prefill"] == before + 1
    torch.testing.assert_close(got, aten.scaled_dot_product_attention.default(x, x, x, causal, scale=0.5))
