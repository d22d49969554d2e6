"""Normalisations read off the graph (RMSNorm, Gemma's ``(1 + w)`` RMSNorm, LayerNorm)
and the linears that read their outputs (the smoothing groups' raw material)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.sites import LinearSite, consumers, get_attr, through_transparent

aten = torch.ops.aten


@dataclass
class NormInfo:
    """A normalisation whose affine weight (and bias) can absorb a smoothing scale."""

    kind: str  # "rmsnorm" | "rmsnorm_plus_one" | "layernorm"
    output: Node
    weight: Node  # get_attr
    bias: Node | None = None
    eps: float | None = None
    input: Node | None = None


def _is_rsqrt_normalized(n: Any) -> tuple[Node | None, float | None]:
    """If ``n`` is ``x * rsqrt(mean(x^2) + eps)``, return (x, eps)."""
    n = through_transparent(n)
    if not (isinstance(n, Node) and n.op == "call_function" and n.target == aten.mul.Tensor):
        return None, None
    for a, b in (n.args, n.args[::-1]):
        if isinstance(b, Node) and b.target == aten.rsqrt.default:
            add = b.args[0]
            if isinstance(add, Node) and add.target in (aten.add.Tensor, aten.add.Scalar):
                eps = add.args[1] if isinstance(add.args[1], float) else None
                return through_transparent(a), eps
    return None, None


def find_norm(gm: GraphModule, out: Node) -> NormInfo | None:
    """Recognise RMSNorm (LLaMA/Qwen/Mistral), ``(1 + w)`` RMSNorm (Gemma) and LayerNorm."""
    out = through_transparent(out)
    if not isinstance(out, Node) or out.op != "call_function":
        return None
    ln = out
    if out.target is operator.getitem and out.args[1] == 0 and isinstance(out.args[0], Node):
        ln = out.args[0]  # native_layer_norm returns (out, mean, rstd)
    if (
        ln.target in (aten.layer_norm.default, aten.native_layer_norm.default)
        and len(ln.args) > 2
        and isinstance(ln.args[2], Node)
    ):
        w = ln.args[2]
        b = ln.args[3] if len(ln.args) > 3 and isinstance(ln.args[3], Node) else None
        if w.op == "get_attr" and (b is None or b.op == "get_attr"):
            eps = ln.args[4] if len(ln.args) > 4 else 1e-5
            return NormInfo("layernorm", out, w, b, eps, ln.args[0])
        return None
    if out.target != aten.mul.Tensor:
        return None
    for a, b in (out.args, out.args[::-1]):
        a_ = through_transparent(a)
        if isinstance(a_, Node) and a_.op == "get_attr" and get_attr(gm, a_.target).dim() == 1:
            x, eps = _is_rsqrt_normalized(b)
            if x is not None:
                return NormInfo("rmsnorm", out, a_, None, eps, x)
        # Gemma: normed * (1.0 + w)
        if isinstance(a_, Node) and a_.target in (aten.add.Tensor, aten.add.Scalar):
            terms = [through_transparent(t) for t in a_.args]
            ws = [t for t in terms if isinstance(t, Node) and t.op == "get_attr"]
            consts = [t for t in a_.args if isinstance(t, (int, float))]
            if len(ws) == 1 and consts in ([1.0], [1]):
                x, eps = _is_rsqrt_normalized(b)
                if x is not None:
                    return NormInfo("rmsnorm_plus_one", out, ws[0], None, eps, x)
    return None


@dataclass
class NormGroup:
    """A norm and the linear sites that read its output."""

    norm: NormInfo
    sites: list[LinearSite]
    other_users: list[Node]  # consumers that are not linears (folding is then unsafe)


def find_norm_groups(gm: GraphModule, sites: list[LinearSite]) -> list[NormGroup]:
    """Every norm that feeds at least one of ``sites``, with all of its consumers."""
    by_node = {s.node: s for s in sites}
    groups: dict[Node, NormGroup] = {}
    for site in sites:
        src = through_transparent(site.x)
        if src in groups:
            continue
        norm = find_norm(gm, src)
        if norm is None:
            continue
        users = consumers(norm.output)
        lin = [by_node[u] for u in users if u in by_node and through_transparent(by_node[u].x) is norm.output]
        others = [u for u in users if u not in by_node]
        groups[src] = NormGroup(norm, lin, others)
    return list(groups.values())
