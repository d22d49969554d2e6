"""quantize_rtn: annotation only; packed weights decode to RTN's rounding."""

import pytest
import torch

from qqq_compile import CompileContext, QuantConfig
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.graph import get_weight, info, linear_sites
from qqq_compile.targets.w4a8.formats import choose_scales, quantize_to_int4
from tests.conftest import tiny_model


@pytest.mark.parametrize("gs,dtype", [(-1, "int8"), (32, "int8"), (32, "float16")])
def test_rtn_annotates_every_linear_but_lm_head(gs, dtype):
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    code_before = gm.code
    res = QuantizeRTN()(gm, CompileContext(quant=QuantConfig(group_size=gs, group_scale_dtype=dtype)))
    assert not res.modified and gm.code == code_before
    for s in linear_sites(gm):
        li = info(s.node)
        if s.name == "lm_head":
            assert li.packed is None and "skip" in li.skipped
            continue
        w = get_weight(gm, s).float()
        assert li.method == "rtn" and li.packed.group_size == gs
        q4 = quantize_to_int4(w, choose_scales(w, gs, dtype))
        assert torch.equal(li.packed.int4(), q4)
        assert li.weight_sqnr_db > 14


def test_group_size_option_overrides_the_config():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(quant=QuantConfig(group_size=-1))
    QuantizeRTN(group_size=32)(gm, ctx)
    packed = [info(s.node).packed for s in linear_sites(gm) if info(s.node).packed is not None]
    assert packed and all(p.group_size == 32 for p in packed)
    with pytest.raises(ValueError, match="group_size"):
        QuantizeRTN(group_size=3)


@pytest.mark.parametrize("gs,dtype", [(-1, "int8"), (32, "int8"), (32, "float16")])
def test_clip_search_lowers_the_weight_error(gs, dtype):
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    quant = QuantConfig(group_size=gs, group_scale_dtype=dtype)
    QuantizeRTN()(gm, CompileContext(quant=quant))
    before = {s.name: info(s.node).weight_sqnr_db for s in linear_sites(gm) if info(s.node).packed is not None}
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    QuantizeRTN(clip_search=True, clip_grid=9, clip_min=0.6)(gm, CompileContext(quant=quant))
    after = {s.name: info(s.node).weight_sqnr_db for s in linear_sites(gm) if info(s.node).packed is not None}
    assert after.keys() == before.keys() and len(after) == 14
    assert all(after[k] >= before[k] - 0.05 for k in after), (before, after)
    gain = sum(after.values()) / len(after) - sum(before.values()) / len(before)
    # Measured mean weight-SQNR gain (dB): 0.0 per channel, 0.0 int8 g32, 0.0 fp16 g32.
    assert gain > 0.1, gain
