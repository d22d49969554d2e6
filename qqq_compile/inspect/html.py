"""``write_html_report``: one self-contained HTML file describing a compiled model.

Everything is inlined (CSS, a few lines of JavaScript, plots as base64 PNG, the graph
as SVG): the file opens offline and references nothing outside itself.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import torch

from qqq_compile.annotations import node_annotation
from qqq_compile.inspect.graphview import graph_view_html
from qqq_compile.inspect.plots import outlier_plot, perplexity_bars, sqnr_bars
from qqq_compile.inspect.table import COLUMNS, cell, linear_nodes, summary, totals

DEFAULT_ACCURACY_JSON = Path("benchmarks/results/accuracy.json")
_OP = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.(\w+)\(")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 24px 48px;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin:18px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:14px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f4f4f4;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.float td{background:#f3f7fc}
.muted{color:#777}.warn{color:#a15c00}.error{color:#b00020}dl.kv{display:grid;grid-template-columns:max-content 1fr;
gap:2px 16px}dl.kv dt{font-weight:600}dl.kv dd{margin:0}img.plot{max-width:100%;border:1px solid #eee}
details{margin:4px 0}summary{cursor:pointer}pre{background:#fafafa;border:1px solid #eee;padding:8px;overflow:auto;
max-height:600px;font-size:12px}.svgwrap{overflow:auto;max-height:800px;border:1px solid #eee;background:#fff}
svg.graph text{font:11px monospace;text-anchor:middle;fill:#222}svg.graph text.sub{font-size:9px;fill:#666}
svg.graph .edge{fill:none;stroke:#b5b5b5;stroke-width:1}svg.graph .edge.q{stroke:#e8590c}
svg.graph .node rect{fill:#fff;stroke:#999}svg.graph .node.qqq rect{fill:#ffd8a8;stroke:#e8590c;stroke-width:2}
svg.graph .node.float-linear rect{fill:#d0ebff;stroke:#1c7ed6;stroke-width:2}svg.graph .node.io rect{fill:#eee}
svg.graph .node.ext rect{fill:#fafafa;stroke-dasharray:3 2}svg.graph .node.smoothed rect{stroke:#2b8a3e}
svg.graph .node:hover rect{stroke:#000;stroke-width:2}svg.graph .node.found rect{stroke:#c2255c;stroke-width:4}
.tag{padding:0 4px;border-radius:3px}.tag.qqq{background:#ffd8a8}.tag.float-linear{background:#d0ebff}
.tag.smoothed{border:1px solid #2b8a3e}input[type=search]{width:280px;padding:3px}
"""

# Sortable tables and a node finder. The body attributes record that the script ran to the
# end and how many plots decoded (tests read them from the rendered DOM).
JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''&&!isNaN(+v))return +v;return td.textContent;}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('th').forEach(function(th,i){
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('sorted-asc');
        t.querySelectorAll('th').forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
        th.classList.add(asc?'sorted-asc':'sorted-desc');
        var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
          if(typeof x!==typeof y){x=String(x);y=String(y);}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  var box=document.getElementById('find-node'),msg=document.getElementById('find-msg');
  if(box){box.addEventListener('change',function(){
    document.querySelectorAll('.node.found').forEach(function(g){g.classList.remove('found');});
    var g=document.getElementById('node-'+box.value.trim());
    if(!g){msg.textContent='no node named '+box.value;return;}
    msg.textContent='';var d=g.closest('details');if(d)d.open=true;
    g.classList.add('found');g.scrollIntoView({block:'center',inline:'center'});
  });}
  window.addEventListener('load',function(){
    var imgs=document.querySelectorAll('img.plot'),ok=0;
    imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;});
    document.body.setAttribute('data-plots',ok+'/'+imgs.length);
  });
  document.body.setAttribute('data-report-ready','1');
})();
"""


def _table(header: list[str], rows: list[list[tuple[str, Any]]], cls: str = "sortable", row_cls=None) -> str:
    """``rows`` hold ``(text, sort_value)`` cells; numeric sort values right-align."""
    out = [
        f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
    ]
    for i, r in enumerate(rows):
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        tds = []
        for text, v in r:
            num = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            attr = f' class="num" data-v="{v}"' if num else ""
            tds.append(f"<td{attr}>{escape(str(text))}</td>")
        out.append(f"<tr{rc}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="muted">No data for this plot ({escape(alt)}).</p>'
    return f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def _get(obj: Any, *names: str) -> Any:
    """First present attribute (or dict key) among ``names``: the smoothing record's
    layout is owned by another module, so read it defensively."""
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return v
    return None


def _vec(v: Any) -> torch.Tensor | None:
    if v is None:
        return None
    try:
        t = torch.as_tensor(v).detach().float().flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        return None
    return t if t.numel() else None


def smoothing_groups(compiled: Any) -> list[dict[str, Any]]:
    """One dict per smoothing group (from the linears' ``smooth`` annotations), in graph order."""
    groups: dict[str, dict[str, Any]] = {}
    for node, li in linear_nodes(compiled):
        sm = node_annotation(node).smooth
        if sm is None:
            continue
        name = str(_get(sm, "group", "group_name", "name") or li.smooth_group or node.name)
        g = groups.get(name)
        if g is None:
            g = groups[name] = {
                "group": name,
                "method": _get(sm, "method"),
                "linears": [],
                "scales": _vec(_get(sm, "scales", "scale")),
                "before": _vec(_get(sm, "act_absmax_before")),
                "after": _vec(_get(sm, "act_absmax_after")),
                "loss_before": _get(sm, "loss_before"),
                "loss_after": _get(sm, "loss_after"),
            }
        g["linears"].append(li.fqn)
    return list(groups.values())


def observed_absmax(compiled: Any) -> list[dict[str, Any]]:
    """Fallback for pipelines without smoothing: observed input ``max |x|`` per linear input."""
    seen, out = set(), []
    for node, li in linear_nodes(compiled):
        t = _vec(li.act_absmax)
        x = node.args[0] if node.args else None
        if t is None or x in seen:
            continue
        seen.add(x)
        out.append({"group": f"input of {li.fqn}", "before": t, "after": None, "before_label": "observed"})
    return out


def load_accuracy(source: Any) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """``(rows, metadata, label)`` from the accuracy benchmark's JSON (a path, or data
    already loaded). Rows need a ``name`` and a numeric ``perplexity``; others are dropped."""
    label = "given data"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"accuracy_json: no file at {path} (run the accuracy benchmark first)")
        source, label = json.loads(path.read_text()), str(path)
    meta: dict[str, Any] = {}
    rows: Any = source
    if isinstance(source, dict):
        meta = {k: v for k, v in source.items() if isinstance(v, (str, int, float, bool))}
        rows = next((source[k] for k in ("rows", "results", "pipelines") if isinstance(source.get(k), list)), None)
        if rows is None:  # {name: {perplexity: ...}}
            rows = [{"name": k, **v} for k, v in source.items() if isinstance(v, dict)]
    out = []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict):
            continue
        ppl = _get(r, "perplexity", "ppl")
        if not isinstance(ppl, (int, float)):
            continue
        out.append({**r, "name": str(_get(r, "name", "pipeline", "preset") or "?"), "perplexity": float(ppl)})
    return out, meta, label


def _op_counts(text: str | None) -> Counter:
    return Counter(".".join(m.groups()) for m in _OP.finditer(text or ""))


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.4g}"
    return "—" if v is None else str(v)


def _overview(compiled: Any, rows: list[dict[str, Any]]) -> str:
    rep = getattr(compiled, "report", None)
    cfg = getattr(rep, "config", {}) or {}
    items = [
        ("model", getattr(compiled, "model_class", None) or "graph"),
        ("preset", cfg.get("preset", "—")),
        ("pipeline", " → ".join(getattr(rep, "pipeline", []) or []) or "—"),
        ("format", json.dumps(cfg.get("quant", {}))),
        ("linears", totals(rows)),
        ("pipeline time", f"{sum(p.seconds for p in getattr(rep, 'passes', [])):.2f} s"),
    ]
    if hasattr(compiled, "weight_bytes"):
        items.append(("weights held", f"{compiled.weight_bytes() / 2**20:.2f} MiB"))
    return '<dl class="kv">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items) + "</dl>"


def _linears_section(rows: list[dict[str, Any]]) -> str:
    body = [[(cell(k, r[k]), r[k] if isinstance(r[k], (int, float)) else None) for k, _ in COLUMNS] for r in rows]
    cls = ["float" if r["format"] == "float" else "" for r in rows]
    return (
        _table([t for _, t in COLUMNS], body, row_cls=cls)
        + f"<p>{escape(totals(rows))}. Click a column header to sort.</p>"
        + _img(sqnr_bars(rows), "weight SQNR per linear")
    )


def _passes_section(compiled: Any) -> str:
    rep = getattr(compiled, "report", None)
    recs = getattr(rep, "passes", []) or []
    body = [
        [
            (p.name, None),
            ("yes" if p.modified else "no", None),
            (f"{p.seconds:.3f}", p.seconds),
            (_fmt(p.sqnr_db) if p.sqnr_db is not None else "—", p.sqnr_db),
        ]
        for p in recs
    ]
    html = _table(["pass", "modified", "seconds", "output SQNR dB vs previous step"], body)
    notes = getattr(rep, "notes", []) or []
    if not notes:
        return html + '<p class="muted">No notes from the passes.</p>'
    items = "".join(
        f'<li class="{escape(n.level)}"><b>{escape(n.pass_name)}</b>'
        + (f" <code>{escape(n.target)}</code>" if n.target else "")
        + f": {escape(n.message)}</li>"
        for n in notes
    )
    return html + f"<h3>Notes ({len(notes)})</h3><ul>{items}</ul>"


def _smoothing_section(compiled: Any) -> str:
    groups = smoothing_groups(compiled)
    if not groups:
        obs = observed_absmax(compiled)
        html = '<p class="muted">No smoothing in this pipeline.</p>'
        if obs:
            html += "<p>Observed activation <code>max |x|</code> per input channel (calibration):</p>"
            html += _img(outlier_plot(obs), "activation absmax per channel")
        return html

    def ratio(t: torch.Tensor | None) -> float | None:
        return None if t is None or float(t.median()) <= 0 else float(t.max() / t.median())

    body = []
    for g in groups:
        rb, ra = ratio(g["before"]), ratio(g["after"])
        smin = float(g["scales"].min()) if g["scales"] is not None else None
        smax = float(g["scales"].max()) if g["scales"] is not None else None
        members = ", ".join(n.rsplit(".", 1)[-1] for n in g["linears"])
        body.append([
            (g["group"], None), (g["method"] or "—", None), (members, None),
            (_fmt(rb), rb), (_fmt(ra), ra),
            (f"{_fmt(smin)} – {_fmt(smax)}" if smin is not None else "—", smax),
            (_fmt(g["loss_before"]), g["loss_before"]), (_fmt(g["loss_after"]), g["loss_after"]),
        ])  # fmt: skip
    header = ["group", "method", "linears", "max/median |x| before", "after", "scales", "loss before", "loss after"]
    return _table(header, body) + _img(outlier_plot(groups), "activation outlier channels before/after smoothing")


def _accuracy_section(accuracy_json: Any) -> str:
    source = accuracy_json
    if source is None:
        if not DEFAULT_ACCURACY_JSON.is_file():
            return f'<p class="muted">No accuracy results (no {escape(str(DEFAULT_ACCURACY_JSON))}).</p>'
        source = DEFAULT_ACCURACY_JSON
    try:
        rows, meta, label = load_accuracy(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f'<p class="error">Could not read the accuracy results: {escape(str(e))}</p>'
    if not rows:
        return f'<p class="muted">{escape(label)} holds no rows with a name and a perplexity.</p>'
    keys = ["name", "perplexity"] + [k for k in ("delta_pct", "seconds", "peak_rss") if any(k in r for r in rows)]
    body = [[(_fmt(r.get(k), 5) if k != "name" else r["name"], r.get(k)) for k in keys] for r in rows]
    info = (
        f"<p>From <code>{escape(label)}</code> (the accuracy benchmark; its model may differ from this report's).</p>"
    )
    if meta:
        info += (
            '<dl class="kv">'
            + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in meta.items())
            + "</dl>"
        )
    return info + _table(keys, body) + _img(perplexity_bars(rows), "perplexity per pipeline")


def _graph_section(compiled: Any) -> str:
    before_text = getattr(compiled, "source_graph", None)
    gm = getattr(compiled, "graph_module", compiled)
    after_text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    cb, ca = _op_counts(before_text), _op_counts(after_text)
    ops = sorted(set(cb) | set(ca), key=lambda o: (not o.startswith("qqq."), -(ca[o] + cb[o]), o))
    changed = [o for o in ops if cb[o] != ca[o]]
    body = [[(o, None), (cb[o] if before_text else "—", cb[o]), (ca[o], ca[o])] for o in changed]
    html = "<h3>Ops that changed</h3>"
    html += _table(["op", "before", "after"], body) if changed else '<p class="muted">No op counts changed.</p>'
    html += (
        "<h3>Lowered graph</h3><p>One row per decoder block; open a row to see its nodes. "
        '<span class="tag qqq">torch.ops.qqq kernel</span> <span class="tag float-linear">linear kept in float</span> '
        '<span class="tag smoothed">input smoothed</span>; hover a node for details. Weights (get_attr) are not drawn. '
        '<label>Find node: <input type="search" id="find-node" placeholder="e.g. w4a8_linear_default_3"></label> '
        '<span id="find-msg" class="warn"></span></p>'
    )
    html += graph_view_html(gm)
    html += "<h3>Readable graphs</h3>"
    if before_text:
        html += f"<details><summary>Before the pipeline (captured)</summary><pre>{escape(before_text)}</pre></details>"
    html += f"<details><summary>After the pipeline (lowered)</summary><pre>{escape(after_text)}</pre></details>"
    return html


def write_html_report(compiled: Any, path: str | Path, *, accuracy_json: Any = None) -> Path:
    """Write a self-contained HTML report for ``compiled`` (a :class:`~qqq_compile.CompiledModel`)
    to ``path`` and return the path.

    ``accuracy_json``: the accuracy benchmark's results (a path, or the loaded JSON).
    If None, ``benchmarks/results/accuracy.json`` under the current directory is used
    when it exists. Needs matplotlib for the plots.
    """
    rows = summary(compiled)
    title = f"qqq_compile report — {getattr(compiled, 'model_class', None) or 'graph'}"
    sections = [
        ("overview", "Overview", _overview(compiled, rows)),
        ("linears", "Linears", _linears_section(rows)),
        ("passes", "Passes", _passes_section(compiled)),
        ("smoothing", "Smoothing", _smoothing_section(compiled)),
        ("accuracy", "Accuracy", _accuracy_section(accuracy_json)),
        ("graph", "Graph", _graph_section(compiled)),
    ]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{sid}">{escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(t)}</h2>{html}</section>' for sid, t, html in sections)
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="muted">generated {stamp} by qqq_compile.inspect</p><nav>{nav}</nav>'
        f"{body}<script>{JS}</script></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a report
    return path
