"""Inspect a compiled model: per-linear summary table and a self-contained HTML report.

* :func:`summary` / :func:`summary_table`: one row per linear (format, bits per weight,
  smoothing, GPTQ, lowering, weight SQNR, why a linear stayed in float).
* :func:`write_html_report`: one HTML file (no network, no external assets) with the
  table, pass timings, notes, plots and the graph before/after with quantized nodes
  highlighted. Plots need matplotlib (``pip install matplotlib``).
"""

from qqq_compile.inspect.html import write_html_report
from qqq_compile.inspect.table import summary, summary_table

__all__ = ["summary", "summary_table", "write_html_report"]
