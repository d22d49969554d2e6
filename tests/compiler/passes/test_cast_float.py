"""cast_float: float weights left after lowering are stored in bf16; ties and outputs kept."""

import pytest
import torch

import qqq_compile as qc
from qqq_compile import CompileContext, QuantConfig
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.cast_float import CastFloatWeights
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.graph import get_attr, linear_sites
from tests.conftest import tiny_calib, tiny_model

CAST = torch.ops.aten._to_copy.default
X = torch.randint(0, 256, (3, 11))


def count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def lowered(arch="llama", **overrides):
    gm = capture(tiny_model(arch, **overrides), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(quant=QuantConfig(group_size=32))
    QuantizeRTN()(gm, ctx)
    Lower()(gm, ctx)
    return gm, ctx


def float_bytes(gm):
    seen = {id(t): t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()}
    return sum(t.numel() * t.element_size() for t in seen.values())


@pytest.mark.parametrize("tied", [True, False])
def test_cast_float_stores_head_and_embedding_in_bf16(tied):
    gm, ctx = lowered(tie_word_embeddings=tied)
    with torch.no_grad():
        ref = gm(input_ids=X).logits
    before, casts = float_bytes(gm), count(gm, CAST)
    res = CastFloatWeights("bfloat16")(gm, ctx)
    assert res.modified
    head = next(s for s in linear_sites(gm) if s.name == "lm_head")
    emb = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    assert get_attr(gm, head.weight.target).dtype == torch.bfloat16
    assert get_attr(gm, emb.args[0].target).dtype == torch.bfloat16
    assert (head.weight.target == emb.args[0].target) == tied  # a tie stays one tensor
    # embedding: cast back after the gather; lm_head: activation in, result out
    assert count(gm, CAST) - casts == 3
    with torch.no_grad():
        out = gm(input_ids=X).logits
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) > 35
    # the float weights (embedding + head dominate) shrink by about half
    assert float_bytes(gm) < 0.6 * before
    # idempotent: a second run finds nothing left to cast
    assert not CastFloatWeights("bfloat16")(gm, ctx).modified


def test_cast_float_is_a_no_op_unless_asked():
    gm, ctx = lowered()
    code = gm.code
    assert not CastFloatWeights()(gm, ctx).modified
    assert gm.code == code


def test_cast_float_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        CastFloatWeights("int8")
    with pytest.raises(qc.ConfigError, match="float_weight_dtype"):
        QuantConfig(float_weight_dtype="fp8")


def test_compile_with_bf16_float_weights_saves_and_loads(tmp_path):
    model = tiny_model("llama")
    config = {"preset": "rtn", "quant": {"group_size": 32, "float_weight_dtype": "bfloat16", "int8_head": False}}
    cm = qc.compile(model, tiny_calib(4), config, progress=False)  # a float lm_head to cast
    # the user's model keeps its fp32 weights
    assert model.lm_head.weight.dtype == torch.float32
    assert get_attr(cm.graph_module, "lm_head.weight").dtype == torch.bfloat16
    cm.save(tmp_path / "m")
    loaded = qc.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, cm(X).logits, rtol=0, atol=0)


def test_compile_adds_cast_float_only_when_the_config_asks():
    model = tiny_model("llama")
    plain = qc.compile(model, tiny_calib(4), {"preset": "rtn", "quant": {"int8_head": False}}, progress=False)
    assert "cast_float" not in plain.report.pipeline
    assert get_attr(plain.graph_module, "lm_head.weight").dtype == torch.float32
