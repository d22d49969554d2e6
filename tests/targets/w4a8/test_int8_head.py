"""int8_head: the lm_head (and the embedding) as int8 W8A8; exact against the torch reference."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.fx import Interpreter

import qqq_compile as qc
from qqq_compile import CompileContext, QuantConfig
from qqq_compile.annotations import KEY, LEGACY_NODE_KEYS, node_annotation
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import PASSES, sqnr_db
from qqq_compile.config import ConfigError
from qqq_compile.graph import get_attr, linear_sites
from qqq_compile.graph.head import find_lm_head
from qqq_compile.targets.w4a8.formats import quantize_int8_per_row
from qqq_compile.targets.w4a8.int8_head import Int8Head, tensor_bytes
from qqq_compile.targets.w4a8.kernels import cpu
from tests.conftest import tiny_calib, tiny_model

aten = torch.ops.aten
W8A8 = torch.ops.qqq.w8a8_linear.default
X = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))


def count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


@functools.cache
def _graph(tied: bool, lower: bool):
    gm = capture(tiny_model("llama", tie_word_embeddings=tied), torch.randint(0, 256, (2, 8))).graph_module
    if lower:
        ctx = CompileContext(quant=QuantConfig(group_size=32))
        QuantizeRTN()(gm, ctx)
        Lower()(gm, ctx)
    return gm


def graph(tied: bool, lower: bool = True):
    """A fresh copy of the (captured once) tiny LLaMA graph, lowered to W4A8 unless ``lower=False``."""
    return copy.deepcopy(_graph(tied, lower)), CompileContext(quant=QuantConfig(group_size=32))


def logits(gm):
    with torch.no_grad():
        return gm(input_ids=X).logits


class _Record(Interpreter):
    """Runs the graph and keeps the arguments every w8a8_linear node was called with."""

    def __init__(self, gm):
        super().__init__(gm)
        self.calls = []

    def call_function(self, target, args, kwargs):
        if target is W8A8:
            self.calls.append(args)
        return super().call_function(target, args, kwargs)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("embedding", [False, True])
def test_head_becomes_w8a8_exactly(tied, embedding):
    gm, ctx = graph(tied)
    head = find_lm_head(gm)
    assert head is not None and head.name == "lm_head"
    w_float = get_attr(gm, head.weight.target).detach().clone()
    linears, embeddings = count(gm, aten.linear.default), count(gm, aten.embedding.default)
    assert Int8Head(embedding=embedding)(gm, ctx).modified

    # op counts: the head is the one w8a8 op; an int8 embedding is two lookups (rows, scales)
    assert count(gm, W8A8) == 1
    assert count(gm, aten.linear.default) == linears - 1
    assert count(gm, aten.embedding.default) == embeddings * (2 if embedding else 1)
    node = next(n for n in gm.graph.nodes if n.target is W8A8)
    # what each rewritten node replaced lives in its one annotation, not under a key of its own
    assert node_annotation(node).int8_head == {"replaced": "linear", "fqn": "lm_head"}
    marked = [node_annotation(n).int8_head for n in gm.graph.nodes if node_annotation(n).int8_head]
    assert sorted(m["replaced"] for m in marked) == (["embedding", "linear"] if embedding else ["linear"])
    assert not [n for n in gm.graph.nodes if LEGACY_NODE_KEYS["int8_head"] in n.meta]
    assert all(type(n.meta[KEY]).__name__ == "NodeAnnotation" for n in gm.graph.nodes if KEY in n.meta)

    # the stored weights are the per-row int8 quantization of the float head
    w8, scale = (get_attr(gm, a.target) for a in node.args[1:3])
    q_ref, s_ref = quantize_int8_per_row(w_float)
    assert torch.equal(w8, q_ref) and torch.equal(scale, s_ref)

    # the graph's logits are exactly the torch reference of W8A8 on the head's input, whose
    # int32 accumulator is exact (float64 of int8 products)
    rec = _Record(gm)
    with torch.no_grad():
        rec.run(X)
    ((x, w8_arg, scale_arg, bias),) = rec.calls
    assert w8_arg is w8 and bias is None
    out = logits(gm)
    ref = cpu.w8a8_linear_torch(x, w8, scale, None)
    assert torch.equal(out, ref)
    q, s = cpu.quantize_act_torch(x.reshape(-1, x.shape[-1]))
    acc = (q.double() @ w8.double().t()).to(torch.int32)
    assert torch.equal(ref.reshape(acc.shape), acc.float() * s * scale)

    # tied tables are shared by the head and the int8 lookup; the float table goes when unused
    emb = [n for n in gm.graph.nodes if n.target is aten.embedding.default]
    if embedding:
        assert emb[0].args[0].target == node.args[1].target or not tied
    else:
        assert get_attr(gm, emb[0].args[0].target).is_floating_point()
    assert any(n.pass_name == "int8_head" and "MB" in n.message for n in ctx.notes)
    # idempotent: nothing float is left to rewrite
    assert not Int8Head(embedding=embedding)(gm, ctx).modified


def test_bytes_saved():
    """Tied 256x64 table: fp32 (64 KiB) -> int8 rows + fp32 scales (17 KiB) with embedding=True."""
    gm, ctx = graph(tied=True)
    before = tensor_bytes(gm)
    Int8Head(embedding=True)(gm, ctx)
    assert before - tensor_bytes(gm) == 256 * 64 * 4 - (256 * 64 + 256 * 4)
    gm, ctx = graph(tied=True)
    Int8Head()(gm, ctx)  # the float table stays for the lookup; the head adds its int8 copy
    assert tensor_bytes(gm) - before == 256 * 64 + 256 * 4


# Measured (tiny random LLaMA, float graph otherwise, 3x11 tokens): head only 41.9 dB (tied) /
# 41.3 dB (untied); head and embedding 40.0 dB (tied) / 39.4 dB (untied). Floors ~1 dB below.
@pytest.mark.parametrize(
    "tied, embedding, floor", [(True, False, 41.0), (False, False, 40.3), (True, True, 39.0), (False, True, 38.4)]
)
def test_logits_sqnr_vs_float(tied, embedding, floor):
    gm, ctx = graph(tied, lower=False)
    ref = logits(gm)
    Int8Head(embedding=embedding)(gm, ctx)
    assert count(gm, W8A8) == 1
    assert sqnr_db(ref, logits(gm)) > floor


def test_only_the_token_embedding_goes_int8():
    """GPT-2's position table stays float (it is not the head's vocabulary), and with no
    float lm_head (here quantized to W4A8 with the rest) no table is touched."""
    gm = capture(tiny_model("gpt2"), torch.randint(0, 256, (2, 8))).graph_module
    assert count(gm, aten.embedding.default) == 2  # wte, wpe
    assert Int8Head(embedding=True)(gm, CompileContext()).modified
    lookups = [n for n in gm.graph.nodes if n.target is aten.embedding.default and n.args[0].op == "get_attr"]
    tables = [get_attr(gm, n.args[0].target) for n in lookups]  # (the scales' lookup reads an unsqueeze)
    assert sorted((t.shape[0], t.dtype) for t in tables) == [(128, torch.float32), (256, torch.int8)]  # wpe, wte
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(quant=QuantConfig(skip=()))
    QuantizeRTN()(gm, ctx)
    Lower()(gm, ctx)
    assert find_lm_head(gm) is None and not Int8Head(embedding=True)(gm, ctx).modified


def test_no_head_is_a_no_op():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return x * 2

    gm = torch.export.export(NoLinear(), (torch.randn(2, 3),)).module()
    assert find_lm_head(gm) is None
    assert not Int8Head(embedding=True)(gm, CompileContext()).modified


def test_registered_and_options_checked():
    assert PASSES.get("int8_head") is Int8Head
    with pytest.raises(ConfigError, match="bool"):
        Int8Head(embedding="yes")
    assert Int8Head.from_config(Int8Head(embedding=True).config) == Int8Head(embedding=True)


def test_compile_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    passes = [*qc.get_preset("rtn"), Int8Head(embedding=True)]
    cm = qc.compile(model, tiny_calib(4), {"preset": "rtn", "quant": {"group_size": 32}}, passes=passes, progress=False)
    gm = cm.graph_module
    assert count(gm, W8A8) == 1 and not [s for s in linear_sites(gm) if s.name == "lm_head"]
    assert model.lm_head.weight.dtype == torch.float32  # the user's model is untouched
    cm.save(tmp_path / "m")
    loaded = qc.load(tmp_path / "m")
    assert count(loaded.graph_module, W8A8) == 1

    def marks(g):
        return sorted((m for n in g.graph.nodes if (m := node_annotation(n).int8_head)), key=lambda m: m["replaced"])

    assert marks(loaded.graph_module) == marks(gm) and len(marks(gm)) == 2  # the head and the embedding
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, cm(X).logits, rtol=0, atol=0)


def test_the_config_option_appends_the_pass():
    """On by default; ``int8_head=False`` keeps the head (and the embedding) in float."""
    assert QuantConfig().int8_head is True
    compiled = qc.compile(tiny_model("llama"), calib=tiny_calib(), config={"preset": "rtn"}, progress=False)
    assert compiled.report.pipeline[-1] == "int8_head"
    assert count(compiled.graph_module, W8A8) == 1
    cfg = {"preset": "rtn", "quant": {"int8_head": False}}
    compiled = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=cfg, progress=False)
    assert "int8_head" not in compiled.report.pipeline and count(compiled.graph_module, W8A8) == 0
    assert [s.name for s in linear_sites(compiled.graph_module)] == ["lm_head"]
