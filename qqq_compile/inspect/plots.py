"""Report plots as base64 PNG strings (matplotlib, Agg canvas; pyplot is never used).

Each function returns the PNG's base64 text, or None when there is nothing to plot.
Figures are drawn on :class:`matplotlib.backends.backend_agg.FigureCanvasAgg`
directly, so making a report never changes the user's matplotlib backend.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

# Colour per projection kind (last name component); anything else gets the default.
KIND_COLOURS = {
    "q_proj": "#1f77b4",
    "k_proj": "#aec7e8",
    "v_proj": "#17becf",
    "o_proj": "#9467bd",
    "gate_proj": "#ff7f0e",
    "up_proj": "#ffbb78",
    "down_proj": "#d62728",
    "fc1": "#ff7f0e",
    "fc2": "#d62728",
    "c_attn": "#1f77b4",
    "c_proj": "#9467bd",
    "c_fc": "#ff7f0e",
    "out_proj": "#9467bd",
}
DEFAULT_COLOUR = "#7f7f7f"
_LAYER = re.compile(r"\.(\d+)\.")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is an optional ('demo') dependency
        raise ImportError(
            "qqq_compile.inspect needs matplotlib for the report's plots: pip install matplotlib "
            "(or pip install 'qqq-compile[demo]')"
        ) from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")  # "tight" keeps legends placed outside the axes
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def sqnr_bars(rows: Sequence[dict[str, Any]]) -> str | None:
    """Weight SQNR (dB) per quantized linear, in graph order, coloured by projection kind,
    with decoder layers separated by thin lines and labelled by index."""
    pts = [r for r in rows if r.get("weight_sqnr_db") is not None and math.isfinite(r["weight_sqnr_db"])]
    if not pts:
        return None
    fig = _figure(min(16.0, max(7.0, 0.06 * len(pts) + 3)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(pts)))
    kinds = [_kind(r["name"]) for r in pts]
    ax.bar(
        xs, [r["weight_sqnr_db"] for r in pts], width=0.85, color=[KIND_COLOURS.get(k, DEFAULT_COLOUR) for k in kinds]
    )
    # One tick per layer (at its first linear), a separator between layers.
    layers = [m.group(1) if (m := _LAYER.search(r["name"])) else None for r in pts]
    ticks, labels = [], []
    for i, lay in enumerate(layers):
        if lay is not None and (i == 0 or layers[i - 1] != lay):
            if i:
                ax.axvline(i - 0.5, color="#dddddd", linewidth=0.6, zorder=0)
            ticks.append(i)
            labels.append(lay)
    step = max(1, len(ticks) // 30)  # keep tick labels legible for deep models
    if ticks:
        ax.set_xticks(ticks[::step], labels[::step], fontsize=7)
        ax.set_xlabel("decoder layer")
    else:
        ax.set_xticks(xs, [r["name"] for r in pts], rotation=90, fontsize=6)
    lo = min(r["weight_sqnr_db"] for r in pts)
    ax.set_ylim(max(0.0, lo - 3), max(r["weight_sqnr_db"] for r in pts) + 2)
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("Quantization error per linear (higher is better)")
    ax.set_xlim(-0.6, len(pts) - 0.4)
    from matplotlib.patches import Patch

    seen = list(dict.fromkeys(kinds))
    handles = [Patch(color=KIND_COLOURS.get(k, DEFAULT_COLOUR), label=k) for k in seen[:12]]
    # Outside the axes, to the right: bars reach the top of the plot.
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return _png(fig)


def _outlier_ratio(t: torch.Tensor) -> float:
    med = float(t.median())
    return float(t.max()) / med if med > 0 else math.inf


def outlier_plot(groups: Sequence[dict[str, Any]], max_groups: int = 4) -> str | None:
    """Per-channel activation ``max |x|`` before (grey) and after (colour) smoothing for a
    few groups spread over the model. Each group dict has ``group``, ``before`` (1-D
    tensor) and optionally ``after`` and ``before_label``."""
    usable = [g for g in groups if isinstance(g.get("before"), torch.Tensor) and g["before"].numel() > 1]
    if not usable:
        return None
    if len(usable) > max_groups:  # first, last and evenly spaced ones between
        idx = sorted({round(i * (len(usable) - 1) / (max_groups - 1)) for i in range(max_groups)})
        usable = [usable[i] for i in idx]
    fig = _figure(10.0, 2.3 * len(usable) + 0.4)
    for i, g in enumerate(usable):
        ax = fig.add_subplot(len(usable), 1, i + 1)
        before = g["before"].float()
        ch = list(range(before.numel()))
        label = g.get("before_label", "before smoothing")
        ax.plot(ch, before.tolist(), color="#999999", linewidth=0.8, label=label)
        title = f"{g['group']}: max/median {_outlier_ratio(before):.1f}"
        after = g.get("after")
        if isinstance(after, torch.Tensor) and after.numel() == before.numel():
            ax.plot(ch, after.float().tolist(), color="#d62728", linewidth=0.8, label="after smoothing")
            title += f" → {_outlier_ratio(after.float()):.1f}"
        ax.set_yscale("log")
        ax.set_xlim(0, len(ch) - 1)
        ax.set_ylabel("max |x|", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    fig.axes[-1].set_xlabel("input channel")
    return _png(fig)


def perplexity_bars(rows: Sequence[dict[str, Any]]) -> str | None:
    """Perplexity per pipeline (horizontal bars), annotated with the change vs the
    reference when the rows carry ``delta_pct``."""
    pts = [r for r in rows if isinstance(r.get("perplexity"), (int, float)) and math.isfinite(r["perplexity"])]
    if not pts:
        return None
    fig = _figure(8.0, 0.45 * len(pts) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(pts)))[::-1]
    vals = [float(r["perplexity"]) for r in pts]
    colours = ["#7f7f7f" if i == 0 else "#1f77b4" for i in range(len(pts))]
    ax.barh(ys, vals, color=colours, height=0.6)
    ax.set_yticks(ys, [str(r.get("name", "?")) for r in pts], fontsize=8)
    for y, r, v in zip(ys, pts, vals, strict=True):
        d = r.get("delta_pct")
        text = f" {v:.2f}" + (f" ({d:+.1f}%)" if isinstance(d, (int, float)) and math.isfinite(d) else "")
        ax.text(v, y, text, va="center", fontsize=8)
    ax.set_xlim(0, max(vals) * 1.25)
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_title("Perplexity per pipeline")
    return _png(fig)
