"""The residual stream of a decoder-only LM, read off the graph: the token embeddings
that start it, the norms that read it (and the linears each norm feeds), the linears
that write into it. ``rotate`` folds an orthogonal ``Q`` along exactly these edges, so
anything else touching the stream (a LayerNorm's mean, the stream as a graph output)
makes :func:`residual_plan` raise :class:`NotRotatable` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.analysis import linear_sites
from qqq_compile.graph.norms import NormInfo, find_norm
from qqq_compile.graph.sites import (
    ASSERT_OPS,
    TRANSPARENT,
    LinearSite,
    consumers,
    get_attr,
    through_transparent,
)

aten = torch.ops.aten


class NotRotatable(Exception):
    """The graph does not have the shape rotation needs (the message says why)."""


@dataclass
class ResidualPlan:
    """The residual stream as read off the graph."""

    embeddings: list[Node] = field(default_factory=list)  # aten.embedding nodes
    norms: list[NormInfo] = field(default_factory=list)
    readers: dict[Node, list[LinearSite]] = field(default_factory=dict)  # norm output → linears
    writers: list[LinearSite] = field(default_factory=list)
    hidden: int = 0


_STREAM_VIEWS = TRANSPARENT | {aten.slice.Tensor}


def _numel1(a) -> bool:
    if isinstance(a, (int, float)):
        return True
    v = a.meta.get("val") if isinstance(a, Node) else None
    return isinstance(v, torch.Tensor) and v.numel() == 1


def _keeps_last_dim(n: Node) -> bool:
    """A view/slice that leaves the hidden (last) dim alone."""
    if n.target == aten.slice.Tensor:
        nd = len(n.args[0].meta["val"].shape)
        return int(n.args[1] if len(n.args) > 1 else 0) % nd != nd - 1
    if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        a, b = n.args[0].meta.get("val"), n.meta.get("val")
        return a is not None and b is not None and str(a.shape[-1]) == str(b.shape[-1])
    return True


def _norm_index(gm: GraphModule) -> dict[Node, list[tuple[NormInfo, set[Node]]]]:
    """Norm input node → [(norm, nodes of the norm computation reading it)]."""
    out: dict[Node, list[tuple[NormInfo, set[Node]]]] = {}
    seen: set[Node] = set()
    for n in gm.graph.nodes:
        norm = find_norm(gm, n) if n.op == "call_function" else None
        if norm is None or norm.output in seen or norm.input is None:
            continue
        seen.add(norm.output)
        inner, stack = set(), [norm.output]
        while stack:  # the nodes between the input and the output
            m = stack.pop()
            if m in inner or m is norm.input:
                continue
            inner.add(m)
            stack.extend(m.all_input_nodes)
        out.setdefault(norm.input, []).append((norm, inner))
    return out


def residual_plan(gm: GraphModule) -> ResidualPlan:
    """Follow the residual stream from the token embedding; raise :class:`NotRotatable`
    when anything other than RMSNorms reads it or anything but linears writes it."""
    # Copies: the plan's sites are re-pointed at untied weights later, and the graph
    # analysis shares its own site objects with every other caller.
    sites = {s.node: replace(s) for s in linear_sites(gm)}
    plan = ResidualPlan()
    plan.embeddings = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target == aten.embedding.default
        and isinstance(n.args[0], Node)
        and n.args[0].op == "get_attr"
    ]
    if not plan.embeddings:
        raise NotRotatable("no token embedding (aten.embedding of a weight) starts a residual stream")
    norms = _norm_index(gm)
    stream, stack = set(), list(plan.embeddings)
    found: dict[Node, NormInfo] = {}
    while stack:
        r = stack.pop()
        if r in stream:
            continue
        stream.add(r)
        for u in list(r.users):
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u.op == "output":
                raise NotRotatable("the residual stream is a graph output (it would come out rotated)")
            # A view of the stream stays on it even when a norm also reads it (OPT views
            # the residual once, then both its LayerNorm and the next add read the view).
            inner = [nm for nm, nodes in norms.get(r, []) + norms.get(through_transparent(r), []) if u in nodes]
            if u.target in _STREAM_VIEWS and _keeps_last_dim(u):
                stack.append(u)
            elif inner:
                found[inner[0].output] = inner[0]
            elif u.target in (aten.mul.Tensor, aten.mul.Scalar) and all(a is r or _numel1(a) for a in u.args):
                stack.append(u)  # Gemma's embedding scale
            elif u.target == aten.add.Tensor and len(u.args) == 2 and all(isinstance(a, Node) for a in u.args):
                other = u.args[1] if u.args[0] is r else u.args[0]
                src = through_transparent(other)
                if other in stream or src in stream or src in plan.embeddings:  # e.g. + position embedding
                    stack.append(u)
                elif src in sites and consumers(src) == [u]:
                    plan.writers.append(sites[src])
                    stack.append(u)
                else:
                    raise NotRotatable(
                        f"{u.name} adds {other.name} to the residual stream, which is not a linear output"
                    )
            else:
                raise NotRotatable(f"{u.name} ({u.target}) reads the residual stream and is not rotation-invariant")
    for norm in found.values():
        if norm.kind == "layernorm":
            raise NotRotatable(
                "the residual stream is read by LayerNorm, which subtracts the mean: that is not "
                "rotation-invariant (fold the centering first, as SliceGPT does)"
            )
        readers = _readers(norm, sites)
        plan.readers[norm.output] = readers
        plan.norms.append(norm)
    hidden = {get_attr(gm, e.args[0].target).shape[1] for e in plan.embeddings}
    if len(hidden) != 1:
        raise NotRotatable(f"embeddings of different widths {sorted(hidden)} feed the residual stream")
    plan.hidden = hidden.pop()
    plan.writers = list({w.node: w for w in plan.writers}.values())
    return plan


def _readers(norm: NormInfo, sites: dict[Node, LinearSite]) -> list[LinearSite]:
    out, stack = [], [norm.output]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u in sites and sites[u].x is n:
                out.append(sites[u])
            elif u.target in _STREAM_VIEWS and _keeps_last_dim(u):
                stack.append(u)
            else:
                raise NotRotatable(f"the output of a norm feeds {u.name} ({u.target}), which is not a linear")
    return out


def from_attention(x: Node) -> bool:
    """True when ``x`` comes (through views/permutes) from an attention product."""
    seen, stack = set(), [x]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in (aten.scaled_dot_product_attention.default, aten.bmm.default, aten.matmul.default):
            return True
        if n.target in TRANSPARENT or n.target in (aten.permute.default, aten.transpose.int):
            stack.append(n.args[0])
    return False


__all__ = ["NotRotatable", "ResidualPlan", "from_attention", "residual_plan"]
