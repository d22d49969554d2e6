"""Attention heads read off the graph: which linear produces an SDPA's values and which
linear reads its output, with the head dim that both are laid out in.

This is what a per-head rotation needs (``rotate``'s ``head_rotation``): rotating every
value head by an orthonormal ``H`` (``v_proj``'s output rows, per KV-head block) and
every query head's slice of ``o_proj``'s input columns by the same ``H`` leaves the
model unchanged, because attention mixes value *vectors* (positions, and under
grouped-query attention the query heads sharing one KV head) but never the channels
inside a head. The tracking below therefore only has to prove that, between the two
linears, every op keeps the aligned head-dim chunks of the channel axis intact: views
and reshapes whose last dims are multiples of the head dim, permutes and transposes
that leave the last dim last, ``expand``/``unsqueeze``/``slice`` away from it (HF's
``repeat_kv``), dtype casts and scalar multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.sites import ASSERT_OPS, TRANSPARENT, LinearSite, attr_users, match_linear, static_size

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def sdpa_arg(n: Node, i: int, name: str, default: object = None) -> object:
    """Argument ``i`` (``name`` as a keyword) of an SDPA node: ``(query, key, value,
    attn_mask, dropout_p, is_causal, *, scale, enable_gqa)``; ``default`` when not given."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME = TRANSPARENT - _RESHAPES  # value-preserving ops that keep the layout
_SCALAR = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


@dataclass
class AttentionHeads:
    """One attention: ``value`` produces the values of ``sdpa`` (one per SDPA node that
    reads them), ``output`` reads the attention output; both in chunks of ``head_dim``."""

    value: LinearSite
    output: list[LinearSite]
    sdpa: list[Node] = field(default_factory=list)
    head_dim: int = 0


def _last(n: Node) -> int | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return static_size(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() else None


def _numel1(a) -> bool:
    if isinstance(a, (int, float)):
        return True
    v = a.meta.get("val") if isinstance(a, Node) else None
    return isinstance(v, torch.Tensor) and v.numel() == 1


def _keeps_heads(u: Node, r: Node, hd: int) -> bool:
    """True when ``u`` maps the aligned ``hd``-chunks of its input ``r``'s last dim onto
    aligned ``hd``-chunks of its output, each chunk kept whole and in order."""
    if u.op != "call_function" or not u.args or u.args[0] is not r:
        return False
    out_last, in_last = _last(u), _last(r)
    if out_last is None or in_last is None:
        return False
    nd_in = r.meta["val"].dim()
    nd_out = u.meta["val"].dim()
    t = u.target
    if t in _RESHAPES:  # row-major: aligned chunks of both last dims are the same memory chunks
        return in_last % hd == 0 and out_last % hd == 0
    if t in _SAME:
        return True
    if t == aten.permute.default:
        return [int(d) % nd_in for d in u.args[1]][-1] == nd_in - 1
    if t == aten.transpose.int:
        return all(int(d) % nd_in != nd_in - 1 for d in u.args[1:3])
    if t == aten.unsqueeze.default:
        return int(u.args[1]) % nd_out != nd_out - 1
    if t == aten.expand.default:
        return out_last == in_last
    if t == aten.slice.Tensor:
        dim = int(u.args[1]) % nd_in if len(u.args) > 1 else 0
        return dim != nd_in - 1 or out_last == in_last
    if t in _SCALAR:
        return len(u.args) == 2 and _numel1(u.args[1])
    return False


def _walk(start: Node, hd: int, stop) -> tuple[list, str | None]:
    """Follow ``start``'s value forward through head-preserving ops; ``stop(u, r)`` returns
    what to collect for a user ``u`` of ``r`` that ends the walk (or None)."""
    found, seen, stack = [], set(), [start]
    while stack:
        r = stack.pop()
        if r in seen:
            continue
        seen.add(r)
        for u in r.users:
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            hit = stop(u, r)
            if hit is not None:
                if hit not in found:
                    found.append(hit)
            elif _keeps_heads(u, r, hd):
                stack.append(u)
            else:
                return found, f"{u.name} ({u.target}) reads it and does not keep the head-dim chunks"
    return found, None


def _only_user(gm: GraphModule, site: LinearSite) -> bool:
    """The site's weight (and bias) are read by this linear alone (not tied)."""
    for attr in (site.weight, site.bias):
        if attr is None:
            continue
        for u in attr_users(gm, attr.target):
            if u.target in ASSERT_OPS or u is site.node or site.node in u.users:
                continue
            return False
    return True


def attention_heads(gm: GraphModule) -> tuple[list[AttentionHeads], list[str]]:
    """Every SDPA whose values come from one linear and whose output goes to linears
    only, through head-preserving ops; and why the other SDPAs do not qualify."""
    found: dict[Node, AttentionHeads] = {}
    why: list[str] = []
    sites = {n: s for n in gm.graph.nodes if (s := match_linear(gm, n)) is not None}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != SDPA or len(node.args) < 3:
            continue
        hd = _last(node.args[2])
        if hd is None or _last(node) != hd:
            why.append(f"{node.name}: the head dim is not static")
            continue
        src = node.args[2]  # walk back to the linear producing the values
        while src not in sites and isinstance(src, Node) and src.op == "call_function" and src.args:
            prev = src.args[0]
            if not isinstance(prev, Node) or not _keeps_heads(src, prev, hd):
                break
            src = prev
        v = sites.get(src)
        if v is None:
            why.append(f"{node.name}: its values do not come from a linear through head-preserving ops")
            continue
        if v.node in found:
            continue  # another SDPA of an attention already found
        sdpas, reason = _walk(v.node, hd, lambda u, r: u if u.target == SDPA and _reads_value_only(u, r) else None)
        outs: list[LinearSite] = []
        for a in sdpas if reason is None else []:
            got, reason = _walk(a, hd, lambda u, r: sites[u] if u in sites and sites[u].x is r else None)
            outs += [o for o in got if o not in outs]
            if reason is not None:
                break
        if reason is None and not outs:
            reason = "its output reaches no linear"
        if reason is None:
            widths = [_last(v.node), *[_last(o.x) for o in outs]]
            if any(w is None or w % hd for w in widths):
                reason = f"a width in {widths} is not a multiple of the head dim {hd}"
            elif not all(_only_user(gm, s) for s in [v, *outs]):
                reason = "a weight is shared with another op (tied)"
        if reason is not None:
            why.append(f"{v.name}: {reason}")
            continue
        found[v.node] = AttentionHeads(v, outs, sdpas, hd)
    return list(found.values()), why


def _reads_value_only(sdpa: Node, r: Node) -> bool:
    """``sdpa`` reads ``r`` as its value and not as its query, key or mask."""
    if sdpa.args[2] is not r:
        return False
    rest = [*sdpa.args[:2], *sdpa.args[3:], *sdpa.kwargs.values()]
    return all(a is not r for a in rest)


__all__ = ["SDPA", "AttentionHeads", "attention_heads", "sdpa_arg"]
