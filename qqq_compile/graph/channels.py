"""Channel tracking: which linears read a producer linear's output channels unmixed.

A :class:`LinearPair` is a producer whose output channels can be rescaled into the
linears that read them (v→o with multi-head attention, up→down through a gated
product) without changing the float model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.sites import ASSERT_OPS, TRANSPARENT, LinearSite, get_weight

aten = torch.ops.aten
DependsOn = Callable[[Node, Node], bool]


@dataclass
class LinearPair:
    """A producer linear whose output reaches ``consumers`` only through ops that are
    linear in it and keep its channels apart (views, permutes, ``* other``, SDPA's
    value input), so scaling the producer's output rows by ``1/s`` and the consumers'
    input columns by ``s`` leaves the float model unchanged (v→o with MHA, up→down).

    ``reason`` is None for a valid pair, else why the producer does not qualify.
    """

    producer: LinearSite
    consumers: list[LinearSite]
    path: list[Node] = field(default_factory=list)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def depends_on(n: Node, ancestor: Node) -> bool:
    """True when ``ancestor`` is among the transitive inputs of ``n`` (or is ``n``)."""
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m is ancestor:
            return True
        if m in seen:
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False


_SAME_LAYOUT = TRANSPARENT - {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SCALAR_LINEAR = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}


def _shape(n: Node) -> tuple | None:
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _static_suffix(shape: tuple, n: int) -> tuple[int, ...] | None:
    """Positions of the shortest suffix of static dims of ``shape`` whose product is ``n``."""
    prod, dims = 1, []
    for d in range(len(shape) - 1, -1, -1):
        if not isinstance(shape[d], int):
            return None
        prod *= shape[d]
        dims.insert(0, d)
        if prod == n:
            return tuple(dims)
        if prod > n:
            return None
    return None


def _track_channels(
    gm: GraphModule, prod: Node, n_out: int, by_node: dict[Node, LinearSite], depends_on: DependsOn = depends_on
):
    """Follow the producer's channels to the linears that read them.

    Returns (consumers, path, reason). The state tracked per value is the tuple of
    dims the producer's channel index is laid out along (major to minor).
    """
    found: list[LinearSite] = []
    path: list[Node] = []
    stack: list[tuple[Node, tuple[int, ...]]] = [(prod, (len(_shape(prod) or (0,)) - 1,))]
    done: set[Node] = set()
    while stack:
        r, chan = stack.pop()
        if r in done:
            continue
        done.add(r)
        shape_r = _shape(r)
        if shape_r is None:
            return found, path, f"{r.name} has no shape metadata"
        for u in r.users:
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u in by_node and by_node[u].x is r and by_node[u].weight is not r:
                if chan != (len(shape_r) - 1,) or shape_r[-1] != n_out:
                    return found, path, f"the channels reach {by_node[u].name} re-ordered or regrouped"
                if by_node[u] not in found:
                    found.append(by_node[u])
                continue
            out_shape = _shape(u)
            if u.op != "call_function" or out_shape is None:
                return found, path, f"the output flows into {u.name} ({u.op})"
            t, nd = u.target, len(out_shape)
            new: tuple[int, ...] | None
            if t in _SAME_LAYOUT:
                new = chan
            elif t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                if [str(d) for d in out_shape] == [str(d) for d in shape_r]:
                    new = chan  # a view to the same shape (HF re-views SDPA's output)
                elif chan != tuple(range(len(shape_r) - len(chan), len(shape_r))):
                    return found, path, f"{u.name} reshapes the channels after a permutation"
                else:
                    new = _static_suffix(out_shape, n_out)
            elif t == aten.permute.default:
                dims = [d % len(shape_r) for d in u.args[1]]
                new = tuple(dims.index(c) for c in chan)
            elif t == aten.transpose.int:
                a, b = (int(d) % len(shape_r) for d in u.args[1:3])
                new = tuple(b if c == a else a if c == b else c for c in chan)
            elif t == aten.unsqueeze.default:
                d = int(u.args[1]) % nd
                new = tuple(c + 1 if c >= d else c for c in chan)
            elif t == aten.slice.Tensor:
                dim = int(u.args[1]) % len(shape_r) if len(u.args) > 1 else 0
                full = (u.args[2] if len(u.args) > 2 else 0) in (0, None) and (
                    u.args[3] if len(u.args) > 3 else None
                ) in (None, 2**63 - 1)
                if dim in chan and not full:
                    return found, path, f"{u.name} slices the channels (e.g. rotary halves)"
                new = chan
            elif t in _SCALAR_LINEAR:
                if t in (aten.div.Tensor, aten.div.Scalar) and u.args[0] is not r:
                    return found, path, f"{u.name} divides by the output"
                others = [a for a in u.args if a is not r]
                if any(isinstance(a, Node) and depends_on(a, prod) for a in others) or list(u.args).count(r) > 1:
                    return found, path, f"{u.name} multiplies the output with a function of itself (a nonlinearity)"
                new = tuple(c + nd - len(shape_r) for c in chan)
            elif t == aten.scaled_dot_product_attention.default:
                if len(u.args) < 3 or u.args[2] is not r or u.args[0] is r or u.args[1] is r:
                    return found, path, f"the output is the query or key of {u.name}"
                if u.kwargs.get("enable_gqa"):
                    return found, path, f"{u.name} shares value heads between query heads (grouped-query attention)"
                if any(depends_on(a, prod) for a in u.args[:2]):
                    return found, path, f"the query or key of {u.name} depends on the output"
                q_shape = _shape(u.args[0])
                if len(shape_r) - 2 in chan or q_shape is None or q_shape[:-2] != shape_r[:-2]:
                    return found, path, f"{u.name} mixes the channels across heads or positions"
                new = chan
            elif t == aten.expand.default:
                return found, path, f"{u.name} repeats the channels (grouped-query attention shares value heads)"
            else:
                return found, path, f"the output goes through {t}, which is not linear in it"
            if new is None:
                return found, path, f"{u.name} regroups the channels"
            path.append(u)
            stack.append((u, new))
    if not found:
        return found, path, "the output reaches no linear"
    return found, path, None


def find_linear_pairs(
    gm: GraphModule,
    sites: list[LinearSite],
    downstream: Callable[[Node], list[LinearSite]],
    depends: DependsOn = depends_on,
    include_rejected: bool = False,
) -> list[LinearPair]:
    """Every producer linear whose output channels can be rescaled into the linears that
    read them (see :class:`LinearPair`). Output-channel counts must match the
    consumers' input columns: with grouped-query attention ``v_proj`` has fewer output
    channels than ``o_proj`` has inputs (and an ``expand`` repeats them), so v→o is
    rejected there. With ``include_rejected`` the refused producers come back too, each
    with its ``reason`` (and, as consumers, the linears its output reaches)."""
    by_node = {s.node: s for s in sites}
    out: list[LinearPair] = []
    for s in sites:
        n_out = get_weight(gm, s).shape[0]
        found, path, reason = _track_channels(gm, s.node, n_out, by_node, depends)
        if reason is None:
            for c in found:
                k = get_weight(gm, c).shape[1]
                if k != n_out:
                    reason = f"{s.name} has {n_out} output channels but {c.name} reads {k} (shared heads)"
        if reason is None or include_rejected:
            out.append(LinearPair(s, found or downstream(s.node), path, reason))
    return out
