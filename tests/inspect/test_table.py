"""The per-linear summary: rows read off a compiled tiny LLaMA, checked against the graph
and against quantization recomputed from the float model's weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import qqq_compile as qc
from qqq_compile.annotations import annotate
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.graph import info
from qqq_compile.inspect import summary, summary_table
from qqq_compile.inspect.table import COLUMNS
from qqq_compile.targets.w4a8.formats import PackedW4
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default


def expected_bits(n: int, k: int, group_size: int = -1) -> float:
    """Packed int4 + fp32 channel scale (+ int8 group scales): the format's true cost."""
    groups = 0 if group_size <= 0 else math.ceil(k / group_size)
    return (n * math.ceil(k / 2) * 8 + 32 * n + 8 * n * groups) / (n * k)


def float_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_rows_follow_the_lowered_graph(rtn_llama):
    model, compiled = rtn_llama
    rows = summary(compiled)
    linears = float_linears(model)
    assert [r["name"] for r in rows] == list(linears)  # graph order is module order here

    n_kernels = sum(1 for n in compiled.graph_module.graph.nodes if n.target is W4A8)
    lowered = [r for r in rows if r["lowered"]]
    assert n_kernels == 14
    assert len(lowered) == n_kernels

    for r in lowered:
        w = linears[r["name"]].weight.detach().float()
        n, k = w.shape
        assert r["shape"] == f"{n}×{k}"
        assert r["format"] == "w4a8 per-channel"
        assert r["group_size"] == -1
        assert r["bits_per_weight"] == pytest.approx(expected_bits(n, k))
        assert 4.06 <= r["bits_per_weight"] <= 4.5
        assert (r["smoothed"], r["gptq"], r["skipped"]) == (None, False, None)
        # The reported SQNR is that of RTN on the user's weights, recomputed here.
        ref = sqnr_db(w, PackedW4.from_float(w).dequantize())
        assert r["weight_sqnr_db"] == pytest.approx(ref, abs=1e-6)
        assert 15.0 < r["weight_sqnr_db"] < 25.0

    (head,) = [r for r in rows if r["name"] == "lm_head"]
    assert head["format"] == "float"
    assert head["lowered"] is False
    assert head["bits_per_weight"] == 32.0  # fp32 weight kept as is
    assert head["group_size"] is None and head["weight_sqnr_db"] is None
    assert "skip" in head["skipped"]


def test_group_format_and_bits():
    model = tiny_model("llama")
    cfg = qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(group_size=32))
    rows = summary(qc.compile(model, tiny_calib(n=2), cfg, progress=False))
    quantized = [r for r in rows if r["lowered"]]
    assert len(quantized) == 14
    for r in quantized:
        n, k = r["out_features"], r["in_features"]
        assert r["format"] == "w4a8 g32 int8-scales"
        assert r["group_size"] == 32
        assert r["bits_per_weight"] == pytest.approx(expected_bits(n, k, 32))


def test_markdown_and_text_tables(rtn_llama):
    _, compiled = rtn_llama
    md = summary_table(compiled).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header == [title for _, title in COLUMNS]
    body = md[2:17]
    assert all(len(line.strip("|").split("|")) == len(COLUMNS) for line in body)
    head_row = next(line for line in body if line.startswith("| lm_head "))
    assert "| float |" in head_row and "| 32.000 |" in head_row
    q_row = next(line for line in body if "layers.0.self_attn.q_proj" in line)
    assert "| w4a8 per-channel | 4.500 | channel |" in q_row
    assert md[-1].startswith("14/15 linears lowered to W4A8")

    text = summary_table(compiled, fmt="text").splitlines()
    col = text[0].index("format")
    rows = text[2:17]
    assert {line[col:].split()[0] for line in rows} == {"w4a8", "float"}  # columns line up
    with pytest.raises(ValueError, match="markdown"):
        summary_table(compiled, fmt="html")


@dataclass
class FakeSmooth:
    """The smoothing record's shape as documented for ``NodeAnnotation.smooth``."""

    group: str
    scales: torch.Tensor
    act_absmax_before: torch.Tensor
    act_absmax_after: torch.Tensor
    loss_before: float
    loss_after: float
    method: str = "qqq"


def test_smoothing_read_from_node_meta(rtn_llama):
    _, compiled = rtn_llama
    qkv = [
        n
        for n in compiled.graph_module.graph.nodes
        if n.target is W4A8 and info(n).fqn.startswith("model.layers.0.self_attn.") and "o_proj" not in info(n).fqn
    ]
    assert len(qkv) == 3
    rec = FakeSmooth("layers.0.attn_in", torch.ones(64), torch.ones(64), torch.ones(64), 1.0, 0.5)
    try:
        for n in qkv:
            annotate(n, smooth=rec)
        rows = {r["name"]: r for r in summary(compiled)}
    finally:
        for n in qkv:
            annotate(n, smooth=None)
    smoothed = {name for name, r in rows.items() if r["smoothed"]}
    assert smoothed == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert rows["model.layers.0.self_attn.q_proj"]["smoothed"] == "layers.0.attn_in"
    assert rows["model.layers.0.self_attn.q_proj"]["smooth_method"] == "qqq"
