"""torch.compile(model, backend="qqq") and the configurable factory."""

import torch

import qqq_compile as qc
from qqq_compile.compiler.pipeline import sqnr_db
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_backend_by_name_no_graph_breaks():
    model = tiny_model("llama")
    x = torch.randint(0, 256, (2, 10))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, backend="qqq", fullgraph=True)
    with torch.no_grad():
        out, ref = compiled(x).logits, model(x).logits
    assert 15.5 < sqnr_db(ref, out) < 30  # quantized: close but not equal (measured 17.1 dB)


def test_backend_factory_with_calibration_and_recompile():
    model = tiny_model("llama")
    backend = qc.qqq_backend(
        calib=tiny_calib(4), config=qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(group_size=32))
    )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 10), (1, 7)]:
            x = torch.randint(0, 256, shape)
            assert sqnr_db(model(x).logits, compiled(x).logits) > 16.5  # measured 17.9 and 18.5 dB
    ops = _ops(backend.last_graph)
    assert ops.count(W4A8) == 14  # 2 layers x 7 projections; lm_head float
    packed = [n for n in backend.last_graph.graph.nodes if n.target == W4A8]
    assert all(n.args[-1] == 32 for n in packed)
