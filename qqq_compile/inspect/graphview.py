"""The graph as inline SVG: one layered DAG drawing per decoder block, no graphviz needed.

A lowered SmolLM2 graph has a few thousand nodes, too many for one drawing, so the
graph is cut into segments (prefix, one per decoder block, suffix; or fixed-size chunks
when no repeated block is found), each drawn on its own and shown in a collapsible
``<details>`` with a one-line summary. ``get_attr`` nodes (weights) and metadata asserts
are left out of the drawing; a node's tooltip names its target, module, shape and, for
linears, the quantization facts.

The layout is computed here (longest-path layers, barycentre ordering within a layer)
so that the report needs no ``dot`` binary and no JavaScript library.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from html import escape
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.graph import BlockIO, LinearInfo, analysis, info, module_fqn

NODE_W, NODE_H, H_GAP, V_GAP, PAD = 138, 34, 14, 26, 12
CHUNK = 150  # nodes per segment when the graph has no repeated blocks
_HIDDEN_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class Segment:
    title: str
    nodes: list[Node] = field(default_factory=list)
    io: BlockIO | None = None  # for decoder blocks: inputs, exit and outputs (dominator tree)


def node_kind(n: Node) -> str:
    """``qqq`` (a torch.ops.qqq kernel), ``float-linear`` (a linear kept in float), ``io`` or ``op``."""
    if n.op in ("placeholder", "output"):
        return "io"
    if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "qqq":
        return "qqq"
    if n.op == "call_function" and str(n.target).startswith("qqq."):
        return "qqq"
    li = info(n)
    if isinstance(li, LinearInfo) and not li.lowered:
        return "float-linear"
    return "op"


def _visible(n: Node) -> bool:
    """Drawn nodes: not weights, metadata asserts or symbolic-shape arithmetic (sym_size,
    SymInt adds), which would tie every block to the inputs with long edges."""
    if n.op == "get_attr" or (n.op == "call_function" and n.target in _HIDDEN_TARGETS):
        return False
    return not (n.op == "call_function" and isinstance(n.meta.get("val"), (torch.SymInt, int)))


def segments(gm: GraphModule) -> list[Segment]:
    """Cut the graph, in node order, into prefix / one segment per block / suffix, with the
    block rule every pass uses (:func:`qqq_compile.graph.partition`)."""
    nodes = list(gm.graph.nodes)
    an = analysis(gm)
    part = an.partition
    if not part.blocks:
        return [
            Segment(f"nodes {i}–{min(i + CHUNK, len(nodes)) - 1}", nodes[i : i + CHUNK])
            for i in range(0, len(nodes), CHUNK)
        ]
    ins = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    segs = [Segment("prefix (inputs, embeddings, masks, positions)", ins + part.prefix)]
    segs += [Segment(b.name, b.nodes, an.block_io(b)) for b in part.blocks]
    segs.append(Segment("suffix (final norm, head, outputs)", part.suffix + outs))
    return [s for s in segs if any(_visible(n) for n in s.nodes)]


def _short_target(n: Node) -> str:
    if n.op in ("placeholder", "output"):
        return n.op
    if n.op == "call_function":
        t = str(n.target)
        parts = t.split(".")
        if len(parts) >= 3 and parts[0] in ("aten", "qqq", "prims", "quantized_decomposed"):
            return parts[1]
        return getattr(n.target, "__name__", t)
    return f"{n.op}:{n.target}"


def _shape(n: Node) -> str:
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}[{', '.join(str(d) for d in v.shape)}]"
    return ""


def _tooltip(n: Node) -> str:
    lines = [f"{n.name} = {n.target}" if n.op == "call_function" else f"{n.name} ({n.op})"]
    if mod := module_fqn(n):
        lines.append(f"module: {mod}")
    if shape := _shape(n):
        lines.append(f"output: {shape}")
    li = info(n)
    if isinstance(li, LinearInfo):
        lines.append(f"linear {li.fqn}: {li.out_features}×{li.in_features}")
        if li.packed is not None:
            p = li.packed
            fmt = "per-channel" if p.group_size <= 0 else f"g{p.group_size} {p.group_scale_dtype} group scales"
            lines.append(f"W4 {fmt}, {p.bits_per_weight():.3f} bits/weight")
        if li.weight_sqnr_db is not None:
            lines.append(f"weight SQNR {li.weight_sqnr_db:.1f} dB")
        if li.skipped:
            lines.append(f"kept in float: {li.skipped}")
    if (sm := node_annotation(n).smooth) is not None:
        group = getattr(sm, "group", None) or getattr(sm, "group_name", None)
        lines.append(f"smoothed ({group or 'group'}, {getattr(sm, 'method', None) or 'smooth'})")
    return "\n".join(lines)


def _layout(nodes: list[Node]) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]], dict[str, Node | str]]:
    """Positions (layer, slot) per key, edges, and what each key stands for (a node, or
    the name of a value coming from outside the segment)."""
    inside = {n for n in nodes if _visible(n)}
    keys: dict[str, Node | str] = {}
    edges: list[tuple[str, str]] = []
    layer: dict[str, int] = {}
    preds: dict[str, list[str]] = defaultdict(list)
    for n in nodes:  # graph order is a topological order
        if n not in inside:
            continue
        keys[n.name] = n
        lay = 0
        for a in n.all_input_nodes:
            if a in inside:
                src = a.name
            elif _visible(a):
                src = "in:" + a.name  # a value from another segment
                if src not in keys:
                    keys[src] = a.name
                    layer[src] = 0
            else:
                continue  # weights / asserts are not drawn
            edges.append((src, n.name))
            preds[n.name].append(src)
            lay = max(lay, layer[src] + 1)
        layer[n.name] = lay
    # Sources (segment inputs, constants like arange) sit just above their first consumer
    # instead of in the top row, so their edges stay short.
    first_use: dict[str, int] = {}
    for src, dst in edges:
        first_use[src] = min(first_use.get(src, 1 << 30), layer[dst])
    for k in keys:
        if not preds[k] and k in first_use:
            layer[k] = max(0, first_use[k] - 1)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for k in keys:
        by_layer[layer[k]].append(k)
    slot: dict[str, float] = {}
    for lay in sorted(by_layer):
        row = by_layer[lay]
        if lay > 0:  # barycentre of the predecessors' slots keeps edges short and uncrossed
            row.sort(key=lambda k: sum(slot[p] for p in preds[k]) / len(preds[k]) if preds[k] else 0.0)
        for i, k in enumerate(row):
            slot[k] = i - (len(row) - 1) / 2
    pos = {k: (layer[k], 0) for k in keys}
    for lay, row in by_layer.items():
        for i, k in enumerate(row):
            pos[k] = (lay, i)
    return pos, edges, keys


def segment_svg(seg: Segment) -> str:
    """One segment as an inline ``<svg>`` (layers top to bottom)."""
    pos, edges, keys = _layout(seg.nodes)
    if not keys:
        return ""
    width_slots = defaultdict(int)
    for lay, _ in pos.values():
        width_slots[lay] += 1
    max_w = max(width_slots.values())
    n_layers = max(lay for lay, _ in pos.values()) + 1
    width = PAD * 2 + max_w * (NODE_W + H_GAP) - H_GAP
    height = PAD * 2 + n_layers * (NODE_H + V_GAP) - V_GAP

    def xy(k: str) -> tuple[float, float]:
        lay, i = pos[k]
        row_w = width_slots[lay] * (NODE_W + H_GAP) - H_GAP
        return (width - row_w) / 2 + i * (NODE_W + H_GAP), PAD + lay * (NODE_H + V_GAP)

    out = [f'<svg class="graph" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    for s, d in edges:
        (x1, y1), (x2, y2) = xy(s), xy(d)
        x1, y1, x2 = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2
        dy = (y2 - y1) / 2
        cls = "edge q" if isinstance(keys[d], Node) and node_kind(keys[d]) == "qqq" else "edge"
        curve = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + dy:.0f} {x2:.0f},{y2 - dy:.0f} {x2:.0f},{y2:.0f}"
        out.append(f'<path class="{cls}" d="{curve}"/>')
    for k, obj in keys.items():
        x, y = xy(k)
        if isinstance(obj, Node):
            kind = node_kind(obj)
            label = _short_target(obj)
            li = info(obj)
            sub = li.fqn.rsplit(".", 2)[-2:] if isinstance(li, LinearInfo) else None
            sub_text = ".".join(sub) if sub else obj.name
            tip = _tooltip(obj)
            node_id = f' id="node-{escape(obj.name)}"'
        else:
            kind, label, sub_text, tip, node_id = "ext", f"← {obj}", "from an earlier segment", f"{obj} (input)", ""
        smooth = " smoothed" if isinstance(obj, Node) and node_annotation(obj).smooth is not None else ""
        out.append(
            f'<g class="node {kind}{smooth}"{node_id} data-name="{escape(k)}"><title>{escape(tip)}</title>'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="5"/>'
            f'<text x="{x + NODE_W / 2:.0f}" y="{y + 14:.0f}">{escape(label[:22])}</text>'
            f'<text class="sub" x="{x + NODE_W / 2:.0f}" y="{y + 27:.0f}">{escape(sub_text[:26])}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)


def segment_summary(seg: Segment) -> dict[str, Any]:
    visible = [n for n in seg.nodes if _visible(n)]
    kinds = [node_kind(n) for n in visible]
    out: dict[str, Any] = {
        "nodes": len(visible),
        "qqq": kinds.count("qqq"),
        "float_linears": kinds.count("float-linear"),
    }
    if seg.io is not None:
        out["inputs"] = [n.name for n in seg.io.inputs]
        out["exit"] = seg.io.exit.name if seg.io.exit is not None else None
        out["side_outputs"] = [n.name for n in seg.io.outputs if n is not seg.io.exit]
    return out


def graph_view_html(gm: GraphModule) -> str:
    """All segments as ``<details>`` rows with a summary line each; quantized nodes highlighted."""
    parts = []
    for seg in segments(gm):
        s = segment_summary(seg)
        tags = f"{s['nodes']} nodes"
        if s["qqq"]:
            tags += f', <span class="tag qqq">{s["qqq"]} W4A8 kernel{"s" if s["qqq"] > 1 else ""}</span>'
        if s["float_linears"]:
            plural = "s" if s["float_linears"] > 1 else ""
            tags += f', <span class="tag float-linear">{s["float_linears"]} float linear{plural}</span>'
        if seg.io is not None:
            tags += f", reads {len(s['inputs'])} earlier value{'s' if len(s['inputs']) != 1 else ''}"
            if s["exit"]:
                tags += f", result leaves through <code>{escape(s['exit'])}</code>"
            if s["side_outputs"]:
                tags += f" (also hands on {escape(', '.join(s['side_outputs'][:4]))})"
        parts.append(
            f'<details class="segment"><summary><code>{escape(seg.title)}</code> — {tags}</summary>'
            f'<div class="svgwrap">{segment_svg(seg)}</div></details>'
        )
    return "\n".join(parts)
