"""fuse_linears: projections reading one input share one W4A8 call; outputs bit-identical."""

import pytest
import torch

from qqq_compile import CompileContext
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.runtime import steps as runtime
from qqq_compile.targets.w4a8.fuse_linears import W4A8, W4A8_Q, FuseLinears
from qqq_compile.targets.w4a8.fuse_norm_quant import FuseNormQuant
from qqq_compile.targets.w4a8.kernels import cpp_call_counts, ensure_cpp_kernels
from tests.conftest import tiny_model


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target == op)


def _lowered(arch, group_size=-1, norm_quant=False):
    gm = capture(tiny_model(arch), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext()
    QuantizeRTN(group_size=group_size)(gm, ctx)
    Lower()(gm, ctx)
    if norm_quant:
        FuseNormQuant()(gm, ctx)
    return gm


# q/k/v (3 -> 1) and gate/up (2 -> 1) per layer; o/down stay alone. OPT's q/k/v read one
# LayerNorm output too; its fc1 reads its own.
@pytest.mark.parametrize(
    "arch,group_size,norm_quant,calls_per_layer",
    [
        ("llama", -1, False, 4),
        ("llama", 32, False, 4),
        ("qwen2", 32, False, 4),
        ("llama", -1, True, 4),
        ("opt", -1, False, 4),
    ],
)
def test_fused_graph_is_bit_identical_with_fewer_calls(arch, group_size, norm_quant, calls_per_layer):
    gm = _lowered(arch, group_size, norm_quant)
    op = W4A8_Q if norm_quant else W4A8
    before = _count(gm, W4A8) + _count(gm, W4A8_Q)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = gm(input_ids=x).logits
    ctx = CompileContext()
    res = FuseLinears()(gm, ctx)
    assert res.modified and any("share one call" in n.message for n in ctx.notes)
    after = _count(gm, W4A8) + _count(gm, W4A8_Q)
    assert after == 2 * calls_per_layer < before  # 2 layers
    assert _count(gm, op) >= 2 * (calls_per_layer - 2)
    with torch.no_grad():
        assert torch.equal(gm(input_ids=x).logits, ref)
    assert not FuseLinears()(gm, CompileContext()).modified  # nothing left to fuse


def test_the_generation_step_runs_the_fused_calls():
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.cpu_supports_kernels():
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: no C++ kernel calls to count")
    assert ensure_cpp_kernels(), "the CPU supports the C++ kernels but they did not build or load"
    import qqq_compile as qc
    from tests.conftest import tiny_calib

    compiled = qc.compile(
        tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False
    )
    # Exact prompt attention, so the fused projections are checked against the model to float rounding.
    step = runtime.build_step(compiled.graph_module, max_batch=1, max_len=16, runtime="eager", bf16_attention=False)
    assert any("share one call" in n for n in step.notes)
    ids = torch.randint(0, 256, (1, 5))
    before = cpp_call_counts()["w4a8_linear"]
    with torch.no_grad():
        got = step(ids, torch.ones(1, 5, dtype=torch.long), torch.arange(5))
    assert cpp_call_counts()["w4a8_linear"] - before == 2 * 4  # not 2 * 7: the fused step ran
    with torch.no_grad():
        want = compiled(ids).logits[:, -1:]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
