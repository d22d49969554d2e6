"""fuse_norm_quant: norms emit int8 once for all their W4A8 consumers; outputs unchanged."""

import pytest
import torch

from qqq_compile import CompileContext
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.targets.w4a8.fuse_norm_quant import RMSNORM_QUANT, W4A8, W4A8_Q, FuseNormQuant
from tests.conftest import tiny_model


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target == op)


@pytest.mark.parametrize("arch,fused", [("llama", 4), ("gemma", 4), ("opt", 0)])
def test_fusion_counts_and_numerics(arch, fused):
    gm = capture(tiny_model(arch), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext()
    QuantizeRTN()(gm, ctx)
    Lower()(gm, ctx)
    n_lin = _count(gm, W4A8)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = gm(input_ids=x).logits
    res = FuseNormQuant()(gm, ctx)
    assert res.modified == bool(fused)
    # per layer: input norm -> q,k,v and post-attention norm -> gate,up; final norm feeds a float lm_head
    assert _count(gm, RMSNORM_QUANT) == fused
    assert _count(gm, W4A8_Q) == (5 * fused // 2)
    assert _count(gm, W4A8) == n_lin - 5 * fused // 2
    with torch.no_grad():
        out = gm(input_ids=x).logits
    # same int8 activations up to fp rounding of the norm: nearly identical outputs
    assert sqnr_db(ref, out) > 35
