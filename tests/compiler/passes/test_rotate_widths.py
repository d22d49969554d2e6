"""rotate on the widths of popular models: a residual stream of 896 (Qwen2.5-0.5B) and
MLP widths 4864 … 18944 get Hadamard matrices (no random orthogonal fallback), the
rotated float model computes the same logits, the report names the orders, and an online
Hadamard sits before every down_proj. One layer, tiny hidden sizes: seconds each."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.hadamard import hadamard_factors
from qqq_compile.graph import linear_sites
from tests.conftest import tiny_calib, tiny_model

VOCAB = 64
# rotate needs no calibration; compile() still checks the few tokens given against the widths.
aten = torch.ops.aten
pytestmark = pytest.mark.filterwarnings("ignore:calibration data holds only")

# width → (arch, config overrides, the orders the note must name)
CASES = {
    896: (
        "qwen2",
        dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=128),
        "28·32",
    ),
    4864: ("qwen2", dict(intermediate_size=4864), "76·64"),
    8960: ("qwen2", dict(intermediate_size=8960), "140·64"),
    11008: ("llama", dict(intermediate_size=11008), "172·64"),
    14336: ("llama", dict(intermediate_size=14336), "28·512"),
    18944: ("qwen2", dict(intermediate_size=18944), "148·128"),
}


def _rotate(arch: str, **cfg):
    model = tiny_model(arch, vocab_size=VOCAB, num_hidden_layers=1, **cfg)
    calib = tiny_calib(2, 8, vocab=VOCAB)
    compiled = qc.compile(model, calib, passes=[{"name": "rotate", "options": {}}], progress=False)
    return model, compiled


@pytest.mark.parametrize("width", list(CASES))
def test_width_gets_a_hadamard_and_stays_float_equivalent(width):
    arch, cfg, orders = CASES[width]
    model, compiled = _rotate(arch, **cfg)
    x = tiny_calib(2, 12, vocab=VOCAB, seed=1)[0]
    with torch.no_grad():
        ref, got = model(x).logits, compiled(x).logits
    # float32 rounding of the folded weights and of the online transform: measured max |Δ|
    # 1.4e-6 at width 896 (logits up to 1.8), 2.7e-7 … 3.6e-7 at the MLP widths (up to 0.66).
    assert (got - ref).abs().max().item() < 1e-5
    notes = [n for n in compiled.report.notes if n.pass_name == "rotate"]
    assert not [n for n in notes if n.level == "warning"], [n.message for n in notes]
    msg = " ".join(n.message for n in notes)
    hidden = cfg.get("hidden_size", 64)
    if width == hidden:
        assert f"rotated the residual stream (width {width}) with a hadamard {orders} matrix" in msg
    else:
        assert f"width {width}: hadamard {orders}" in msg
    # An online Hadamard (annotated with its width) feeds every down_proj.
    gm = compiled.graph_module
    downs = [s for s in linear_sites(gm) if s.name.endswith("down_proj")]
    inter = cfg.get("intermediate_size")
    assert downs and all(node_annotation(s.node).rotate == "writer+online_hadamard" for s in downs)
    assert all(node_annotation(s.x).online_hadamard == inter for s in downs)
    assert f"online Hadamard before {len(downs)} MLP output projection(s)" in msg
    # ... as one mm (the last factor) and one bmm per other factor, on views of contiguous
    # tensors: no transposed copy of the activation, no k×k matmul.
    factors = hadamard_factors(inter)
    for s in downs:
        ops = _chain_ops(s.x)
        assert ops.count(aten.mm.default) == 1 and ops.count(aten.bmm.default) == len(factors) - 1, ops
        assert not {aten.clone.default, aten.transpose.int, aten.permute.default, aten.matmul.default} & set(ops)


def _chain_ops(y):
    """The ops between the MLP's product (``aten.mul``) and the online transform's output."""
    ops, todo, seen = [], [y], set()
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function" or n.target == aten.mul.Tensor:
            continue
        seen.add(n)
        ops.append(n.target)
        todo.extend(n.all_input_nodes)
    return ops


def test_width_without_a_hadamard_is_a_warning():
    # 92 = 4·23 (residual) and 23·4·2 = 184 (MLP) need a Williamson matrix of order 23: not built.
    model, compiled = _rotate(
        "llama", hidden_size=92, num_attention_heads=2, num_key_value_heads=1, intermediate_size=184
    )
    warnings = [n.message for n in compiled.report.notes if n.pass_name == "rotate" and n.level == "warning"]
    assert any("residual width 92 admits no Hadamard" in m and "random orthogonal" in m for m in warnings), warnings
    assert any("MLP width 184 admits no Hadamard" in m and "no online transform" in m for m in warnings), warnings
    x = tiny_calib(2, 12, vocab=VOCAB, seed=1)[0]
    with torch.no_grad():
        assert (compiled(x).logits - model(x).logits).abs().max().item() < 1e-5
