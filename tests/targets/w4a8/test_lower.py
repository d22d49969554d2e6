"""lower: linears become torch.ops.qqq.w4a8_linear; outputs match the fake-quant reference."""

import pytest
import torch

from qqq_compile import CompileContext, QuantConfig
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.graph import info, linear_sites
from qqq_compile.targets.w4a8.formats import fake_quant_act
from tests.conftest import tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default


def count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def fake_quant_reference(model, packed_by_name):
    """The model with each quantized nn.Linear replaced by dequant(W) @ fakequant(x)."""

    def hook(mod, inp):
        return (fake_quant_act(inp[0]),)

    for name, mod in model.named_modules():
        if name in packed_by_name:
            w = packed_by_name[name].dequantize()
            if type(mod).__name__ == "Conv1D":  # GPT-2 stores [K, N]
                w = w.t().contiguous()
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
            mod.register_forward_pre_hook(hook)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("gs", [-1, 32])
def test_lower_rewrites_linears_and_matches_reference(arch, gs):
    model = tiny_model(arch)
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(quant=QuantConfig(group_size=gs))
    n_linear = len(linear_sites(gm))
    QuantizeRTN()(gm, ctx)
    packed = {s.name: info(s.node).packed for s in linear_sites(gm) if info(s.node).packed is not None}
    res = Lower()(gm, ctx)
    assert res.modified
    assert count(gm, W4A8) == len(packed) == n_linear - 1  # lm_head stays float
    assert len(linear_sites(gm)) == 1
    # float weights of lowered linears are gone from the module
    names = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert not [k for k in names if k.endswith(("q_proj.weight", "c_attn.weight", "fc1.weight"))]
    x = torch.randint(0, 256, (3, 11))
    ref_model = fake_quant_reference(tiny_model(arch), packed)
    with torch.no_grad():
        out = gm(input_ids=x).logits
        ref = ref_model(x).logits
    assert sqnr_db(ref, out) > 40


def test_lowered_graph_reexports_and_prints_qqq_ops():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext()
    QuantizeRTN()(gm, ctx)
    Lower()(gm, ctx)
    assert "torch.ops.qqq.w4a8_linear.default" in gm.code
    x = torch.randint(0, 256, (2, 9))
    ep = torch.export.export(
        gm,
        (),
        {"input_ids": x},
        dynamic_shapes={"input_ids": {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2)}},
    )
    with torch.no_grad():
        y = torch.randint(0, 256, (3, 5))
        torch.testing.assert_close(ep.module()(input_ids=y).logits, gm(input_ids=y).logits)


def test_lower_without_annotations_is_a_noop():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    assert not Lower()(gm, CompileContext()).modified


def test_directly_chained_linears_lower():
    """A linear whose input is another linear's output: the second reads the first's lowered node."""
    import qqq_compile as qc

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    compiled = qc.compile(model, [x], {"preset": "rtn"}, progress=False)
    ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qqq.w4a8_linear.default) == 2
    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, compiled(x)) > 18.5  # measured 19.66 dB (seeded; W4A8 RTN per channel, random weights)
