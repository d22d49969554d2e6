"""Smoothing groups of the ``smooth`` pass, read off the graph (a helper module, not a pass).

A group is a set of linears whose shared input channels can be rescaled by ``s``, plus
where the ``1/s`` goes: a norm's affine weight and bias (RMSNorm, ``(1 + w)`` RMSNorm,
LayerNorm with bias) or a producer linear's output rows (:func:`qqq_compile.graph.linear_pairs`).
Groups whose folding would change the model or another tensor carry the reason in
``unsafe``; linears in no group get theirs from :func:`unsmoothable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph import (
    ASSERT_OPS,
    LinearSite,
    NormInfo,
    get_attr,
    get_bias,
    get_weight,
    is_skipped,
    linear_pairs,
    linear_sites,
    module_fqn,
    norm_groups,
    set_attr,
    set_weight,
    through_transparent,
)

aten = torch.ops.aten
_ATTENTION = {aten.scaled_dot_product_attention.default, aten.bmm.default, aten.matmul.default}


@dataclass
class SmoothGroup:
    """A set of linears whose shared input channels can be rescaled, and where the
    ``1/s`` goes: a norm's affine parameters or a producer linear's output rows."""

    name: str
    linears: list[LinearSite]
    norm: NormInfo | None = None
    producer: LinearSite | None = None
    unsafe: str | None = None
    # "norm"; for a producer: "attention" (v→o, through SDPA) or "mlp" (up→down, gated)
    kind: str = "norm"


# ----------------------------------------------------------------------------- groups


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _shared_attrs(gm: GraphModule) -> dict[str, list[str]]:
    """Attribute name → other attribute names that share its storage (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        by_ptr.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {n: [m for m in names if m != n] for names in by_ptr.values() for n in names}


def _attr_shared(gm: GraphModule, attr: Node, owners: set[Node], shared: dict[str, list[str]]) -> str | None:
    """Why the tensor behind ``attr`` is used outside ``owners`` (None if it is not)."""
    if shared.get(attr.target):
        return f"{attr.target} shares storage with {shared[attr.target][0]}"
    for n in attr.graph.nodes:
        if n.op == "get_attr" and n.target == attr.target:
            for u in n.users:
                if u.op == "call_function" and u.target in ASSERT_OPS:
                    continue
                if u not in owners:
                    return f"{attr.target} is also read by {module_fqn(u) or u.name}"
    return None


def _norm_nodes(norm: NormInfo) -> set[Node]:
    """The nodes between the norm's weight and its output (Gemma's ``1 + w`` add)."""
    out, stack = set(), [norm.output]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(a for a in n.all_input_nodes if a is not norm.input and a.op != "placeholder")
    return out


def _linear_nodes(site: LinearSite) -> set[Node]:
    """The linear node and any transpose between it and its weight."""
    return {site.node} | {a for a in site.node.all_input_nodes if a is not site.x and a.op == "call_function"}


def smoothing_groups(gm: GraphModule) -> list[SmoothGroup]:
    """Every smoothing group of the graph, in graph order, with ``unsafe`` set (and the
    reason) where folding would change the model or another tensor."""
    shared = _shared_attrs(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: list[SmoothGroup] = []

    def tied(site: LinearSite) -> str | None:
        for attr in (site.weight, site.bias):
            if attr is not None and (why := _attr_shared(gm, attr, _linear_nodes(site), shared)):
                return f"{site.name}'s weight is tied: {why}"
        return None

    for g in norm_groups(gm):
        if not g.sites:
            continue
        sites = sorted(g.sites, key=lambda s: order[s.node])
        norm_name = module_fqn(g.norm.output) or g.norm.weight.target
        name = f"{norm_name}→" + ",".join(_short(s.name) for s in sites)
        unsafe = None
        if g.other_users:
            users = ", ".join(module_fqn(u) or u.name for u in g.other_users)
            unsafe = f"the norm output also feeds {users}, which is not a linear"
        for attr in (g.norm.weight, g.norm.bias):
            if unsafe is None and attr is not None:
                why = _attr_shared(gm, attr, _norm_nodes(g.norm), shared)
                unsafe = f"the norm's parameter is shared: {why}" if why else None
        for s in sites:
            unsafe = unsafe or tied(s)
        groups.append(SmoothGroup(name, sites, norm=g.norm, unsafe=unsafe))
    for p in linear_pairs(gm):
        name = f"{p.producer.name}→" + ",".join(_short(c.name) for c in p.consumers)
        unsafe = tied(p.producer)
        for c in p.consumers:
            unsafe = unsafe or tied(c)
        kind = "attention" if any(n.target in _ATTENTION for n in p.path) else "mlp"
        groups.append(SmoothGroup(name, list(p.consumers), producer=p.producer, unsafe=unsafe, kind=kind))
    return sorted(groups, key=lambda g: min(order[s.node] for s in g.linears))


def unsmoothable(gm: GraphModule, groups: list[SmoothGroup], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Why each linear outside every smoothing group has none (reason → linear names):
    its input comes from neither a norm nor a producer linear whose output channels reach
    it unmixed (a GELU between two linears, a graph input, grouped-query heads)."""
    covered = {s.node for g in groups for s in g.linears}
    rejected: dict[Node, str] = {}
    for p in linear_pairs(gm, include_rejected=True):
        for c in p.consumers if not p.ok else []:
            rejected[c.node] = f"its producer {p.producer.name} does not qualify ({p.reason})"
    out: dict[str, list[str]] = {}
    for s in linear_sites(gm):
        if s.node in covered or is_skipped(s.name, skip):
            continue
        src = through_transparent(s.x)
        if s.node in rejected:
            why = rejected[s.node]
        elif isinstance(src, Node) and src.op == "placeholder":
            why = f"it reads the graph input '{src.target}' (no norm or linear to fold 1/s into)"
        else:
            op = getattr(getattr(src, "target", None), "__name__", None) or str(getattr(src, "target", src))
            why = f"it reads {op} (neither a norm nor a linear, so 1/s has nowhere to go)"
        out.setdefault(why, []).append(s.name)
    return out


def fold_scales(gm: GraphModule, g: SmoothGroup, s: torch.Tensor) -> None:
    """Fold ``s`` into the graph: the norm's weight/bias or the producer's rows absorb
    ``1/s``, the group's linears' input columns ``s`` (new tensors, never in place)."""
    if g.norm is not None:
        w = get_attr(gm, g.norm.weight.target)
        sw = s.to(w.dtype)
        new = (1 + w) / sw - 1 if g.norm.kind == "rmsnorm_plus_one" else w / sw
        set_attr(gm, g.norm.weight.target, new.detach().clone())
        if g.norm.bias is not None:
            b = get_attr(gm, g.norm.bias.target)
            set_attr(gm, g.norm.bias.target, (b / s.to(b.dtype)).detach().clone())
    else:
        p = g.producer
        w = get_weight(gm, p)
        set_weight(gm, p, w / s.to(w.dtype)[:, None])
        if p.bias is not None:
            b = get_bias(gm, p)
            set_attr(gm, p.bias.target, (b / s.to(b.dtype)).clone())
    for site in g.linears:
        w = get_weight(gm, site)
        set_weight(gm, site, w * s.to(w.dtype)[None, :])
