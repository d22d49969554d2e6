"""The per-linear summary: one row of facts per linear site of a compiled model.

Everything is read from the annotations the passes left behind (each linear's
:class:`~qqq_compile.annotations.NodeAnnotation`: its ``LinearInfo`` and the ``smooth``
record written by the smoothing pass) and from the lowered graph itself; nothing is
recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.graph import LinearInfo, get_attr, info, match_linear

COLUMNS: list[tuple[str, str]] = [
    ("name", "name"),
    ("shape", "shape (N×K)"),
    ("format", "format"),
    ("bits_per_weight", "bits/weight"),
    ("group_size", "group"),
    ("smoothed", "smoothed"),
    ("gptq", "GPTQ"),
    ("lowered", "lowered"),
    ("weight_sqnr_db", "weight SQNR dB"),
    ("skipped", "skipped reason"),
]


def _graph_module(compiled: Any) -> GraphModule:
    gm = getattr(compiled, "graph_module", compiled)
    if not isinstance(gm, GraphModule):
        raise TypeError(
            f"expected a CompiledModel (from qqq_compile.compile) or a GraphModule, got {type(compiled).__name__}"
        )
    return gm


def linear_nodes(compiled: Any) -> Iterator[tuple[Node, LinearInfo]]:
    """``(node, LinearInfo)`` for every annotated linear, in graph order."""
    for n in _graph_module(compiled).graph.nodes:
        li = info(n)
        if isinstance(li, LinearInfo):
            yield n, li


def smooth_group(node: Node, li: LinearInfo) -> str | None:
    """The smoothing group a linear belongs to (None if its input was not smoothed)."""
    if li.smooth_group:
        return li.smooth_group
    sm = node_annotation(node).smooth
    if sm is None:
        return None
    return getattr(sm, "group", None) or getattr(sm, "group_name", None) or getattr(sm, "name", None) or "yes"


def format_name(li: LinearInfo) -> str:
    """``"w4a8 per-channel"``, ``"w4a8 g128 int8-scales"`` or ``"float"``."""
    p = li.packed
    if p is None:
        return "float"
    if p.group_size <= 0:
        return "w4a8 per-channel"
    return f"w4a8 g{p.group_size} {p.group_scale_dtype}-scales"


def _float_bits(gm: GraphModule, node: Node) -> float | None:
    """Bits per weight of a linear still in float (the stored weight's dtype)."""
    try:
        site = match_linear(gm, node)
        if site is None:
            return None
        w = get_attr(gm, site.weight.target)
    except (AttributeError, TypeError):
        return None
    return float(w.element_size() * 8) if isinstance(w, torch.Tensor) else None


def summary(compiled: Any) -> list[dict[str, Any]]:
    """One dict per linear, in graph order, with the keys of :data:`COLUMNS` plus
    ``out_features``, ``in_features``, ``method`` and ``smooth_method``.

    ``bits_per_weight`` counts the scales (``PackedW4.bits_per_weight``); for a linear
    kept in float it is the width of its stored dtype. ``group_size`` is -1 for
    per-channel scales and None for float linears.
    """
    gm = _graph_module(compiled)
    rows = []
    for node, li in linear_nodes(gm):
        p = li.packed
        sm = node_annotation(node).smooth
        rows.append(
            {
                "name": li.fqn,
                "shape": f"{li.out_features}×{li.in_features}",
                "out_features": li.out_features,
                "in_features": li.in_features,
                "format": format_name(li),
                "bits_per_weight": p.bits_per_weight() if p is not None else _float_bits(gm, node),
                "group_size": p.group_size if p is not None else None,
                "smoothed": smooth_group(node, li),
                "smooth_method": getattr(sm, "method", None) if sm is not None else None,
                "gptq": li.method == "gptq",
                "method": li.method,
                "lowered": bool(li.lowered),
                "weight_sqnr_db": li.weight_sqnr_db,
                "skipped": li.skipped,
            }
        )
    return rows


def cell(key: str, value: Any) -> str:
    """A row value as table text."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "bits_per_weight":
        return f"{value:.3f}"
    if key == "weight_sqnr_db":
        return f"{value:.1f}"
    if key == "group_size":
        return "channel" if value <= 0 else str(value)
    return str(value)


def totals(rows: list[dict[str, Any]]) -> str:
    """One line: how many linears were lowered and the weight-weighted bits per weight."""
    low = [r for r in rows if r["lowered"]]
    n_w = sum(r["out_features"] * r["in_features"] for r in low)
    bits = sum(r["bits_per_weight"] * r["out_features"] * r["in_features"] for r in low) / n_w if n_w else None
    text = f"{len(low)}/{len(rows)} linears lowered to W4A8"
    if bits is not None:
        text += f", {bits:.3f} bits per weight over the lowered linears (scales included)"
    return text


def summary_table(compiled: Any, fmt: str = "markdown") -> str:
    """The summary as a Markdown table (``fmt="markdown"``) or aligned plain text (``"text"``),
    followed by a totals line."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"summary_table: fmt must be 'markdown' or 'text', got {fmt!r}")
    rows = summary(compiled)
    header = [title for _, title in COLUMNS]
    body = [[cell(k, r[k]).replace("|", "\\|" if fmt == "markdown" else "|") for k, _ in COLUMNS] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    return "\n".join([*lines, "", totals(rows)]) + "\n"
