"""benchmarks/accuracy.py: rows as data, the split-error rewrite, the table and its pick."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402
import accuracy_rows as ar  # noqa: E402

from tests.conftest import tiny_calib, tiny_model  # noqa: E402

# ------------------------------------------------------------------------------ rows


def test_extra_row_parses_and_rejects() -> None:
    name, row = ar.parse_extra_row(
        'clip={"preset": "qqq", "quant": {"group_size": 128}, "options": {"rotation": true}}'
    )
    assert name == "clip" and row.label == "clip" and row.preset == "qqq" and row.options == {"rotation": True}
    assert row.is_candidate and row.config() == {
        "preset": "qqq",
        "quant": {"group_size": 128},
        "preset_options": {"rotation": True},
    }
    assert ar.Row.from_dict(json.loads(json.dumps(row.to_dict()))) == row  # travels to the child as JSON
    with pytest.raises(ValueError, match="unknown row key.*'presets'"):
        ar.parse_extra_row('x={"presets": "qqq"}')
    with pytest.raises(ValueError, match="does not parse"):
        ar.parse_extra_row("x={preset: qqq}")
    with pytest.raises(ValueError, match="NAME=JSON"):
        ar.parse_extra_row('{"preset": "qqq"}')
    with pytest.raises(ValueError, match="mode="):
        ar.parse_extra_row('x={"preset": "qqq", "mode": "w2a2"}')
    with pytest.raises(ValueError, match="FP32"):
        ar.parse_extra_row('x={"mode": "w4a16"}')


def test_derived_rows() -> None:
    row = ar.resolve_row("rot_gptq_g128:w16a8", ar.OWN_ROWS)
    assert row.mode == "w16a8" and not row.is_candidate and "activations only" in row.label
    assert row.options == ar.OWN_ROWS["rot_gptq_g128"].options
    assert ar.resolve_row("fp32", ar.OWN_ROWS).is_fp32 and not ar.OWN_ROWS["fp32"].is_candidate
    with pytest.raises(KeyError):
        ar.resolve_row("nope:w4a16", ar.OWN_ROWS)
    with pytest.raises(ValueError, match="mode after"):
        ar.resolve_row("qqq_pc:w3a3", ar.OWN_ROWS)
    for name in ar.DEFAULT_ROWS:  # every default row resolves
        assert name in ar.PEER_ROWS or ar.resolve_row(name, ar.OWN_ROWS)


# ------------------------------------------------------------------- split_error


def _compiled(mode: str):
    import qqq_compile as qc

    model = tiny_model("llama")
    row = ar.Row("rtn", "rtn", {"group_size": -1, "int8_head": False}, mode=mode)  # as the built-in rows
    passes, dropped = (None, []) if mode == "w4a8" else ar.split_passes(row)
    cm = qc.compile(model, tiny_calib(), row.config(), passes=passes, progress=False)
    return model, cm, dropped


def test_split_error_decomposes_the_kernels() -> None:
    from qqq_compile.graph import get_weight, info, linear_sites
    from qqq_compile.targets.w4a8.formats import fake_quant_act

    x = tiny_calib(n=2, seed=5)[0]
    model, kernels, _ = _compiled("w4a8")
    with torch.no_grad():
        y_fp, y_k = model(x).logits, kernels(x).logits
    n_lin = sum(1 for li in kernels.linears() if li.lowered)
    assert n_lin == 14  # 7 per block, lm_head float

    outs = {}
    for mode in ("fake", "w4a16", "w16a8"):
        _, cm, dropped = _compiled(mode)
        assert dropped == ["lower"]
        gm = cm.graph_module
        assert ar.split_error(gm, mode) == n_lin
        fq = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fake_quant_act]
        assert len(fq) == (0 if mode == "w4a16" else n_lin)
        for site in linear_sites(gm):
            li = info(site.node)
            if li is not None and li.packed is not None:
                w = get_weight(gm, site)
                want = li.packed.dequantize() if mode != "w16a8" else model.get_submodule(li.fqn).weight
                assert torch.equal(w, want), (mode, li.fqn)
        with torch.no_grad():
            outs[mode] = cm(x).logits

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # Fake quantization of both sides computes what the kernels compute (float rounding only).
    assert rel(outs["fake"], y_k) < 1e-4
    # Each half carries part of the error, and neither is the whole of it.
    err = rel(y_k, y_fp)
    assert err > 1e-2
    for mode in ("w4a16", "w16a8"):
        assert 1e-4 * err < rel(outs[mode], y_fp) < err, mode


def test_w16a8_skips_gptq() -> None:
    row = ar.resolve_row("gptq_pc:w16a8", ar.OWN_ROWS)
    passes, dropped = ar.split_passes(row)
    assert [p.name for p in passes] == ["quantize_rtn"] and dropped == ["gptq", "lower"]
    passes, dropped = ar.split_passes(ar.resolve_row("gptq_pc:w4a16", ar.OWN_ROWS))
    assert [p.name for p in passes] == ["gptq", "quantize_rtn"] and dropped == ["lower"]
    # Explicit pass lists may name passes no preset imported yet (rotate, smooth).
    passes, dropped = ar.split_passes(ar.resolve_row("rot_gptq_g128_no_online:w16a8", ar.OWN_ROWS))
    assert [p.name for p in passes] == ["rotate", "quantize_rtn"] and dropped == ["gptq", "lower"]
    assert passes[0].online_down_proj is False


# ------------------------------------------------------------------------- table


def _r(name: str, ppl: dict, fmt: str | None = None, **kw) -> dict:
    row = ar.resolve_row(name, ar.OWN_ROWS) if name.split(":")[0] in ar.OWN_ROWS else None
    out = {"row": name, "label": name, "ppl": ppl, **kw}
    if row is not None:
        out["spec"] = row.to_dict()
    if fmt:
        out["format"] = fmt
        out.setdefault("w4a8_linears", 14)
    return out


def test_table_picks_lowest_val_per_format_among_candidates() -> None:
    results = {
        "protocol": "P",
        "order": [
            "fp32",
            "qqq_pc",
            "rot_gptq_pc",
            "rot_gptq_pc:w4a16",
            "qqq_g128",
            "rtn_g128",
            "llmc_gptq_pc",
            "fp32_int8",
        ],
        "rows": [
            _r("rot_gptq_pc:w4a16", {"val": 10.0, "eval": 10.0}, "per-channel"),  # not a candidate
            _r("fp32", {"val": 10.0, "eval": 20.0, "lee": 30.0}, bits_per_weight=32.0),
            _r("qqq_pc", {"val": 13.0, "eval": 21.0, "lee": 33.0}, "per-channel", bits_per_weight=4.06),
            _r("rot_gptq_pc", {"val": 12.0, "eval": 24.0, "lee": 36.0}, "per-channel"),
            _r("qqq_g128", {"val": 11.5, "eval": 22.0}, "g128 int8 group scales"),
            _r("rtn_g128", {"val": 11.0, "eval": 25.0}, "g128 int8 group scales"),
            _r("llmc_gptq_pc", {"val": 5.0, "eval": 5.0}),  # a peer: never picked
            # an extra row with no W4A8 linear (FP32 + int8 lm_head): a candidate by default, never picked
            _r("fp32_int8", {"val": 9.0, "eval": 9.0}, spec={"label": "x", "passes": [{"name": "int8_head"}]}),
            {"row": "torchao_8da4w_g128", "label": "ao", "error": "exit 1:\nAssertionError: 576 | 128"},
        ],
    }
    picks = accuracy.picks(results)
    assert {f: r["row"] for f, r in picks.items()} == {
        "per-channel": "rot_gptq_pc",
        "g128 int8 group scales": "rtn_g128",
    }
    table = accuracy._table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| row | pick | val ppl | val Δ | eval ppl | eval Δ | lee ppl | lee Δ | bits/weight")
    body = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split(" | ")[0][2:] for ln in body] == [
        "fp32",
        "rtn_g128",
        "qqq_pc",
        "qqq_g128",
        "rot_gptq_pc",
        "rot_gptq_pc:w4a16",
        "fp32_int8",
        "llmc_gptq_pc",
        "ao",
    ]
    rot = next(ln for ln in body if ln.startswith("| rot_gptq_pc |"))
    assert "**pick**" in rot and "| +20.00% |" in rot and "| +20.00% | 36.000 | +20.00% |" in rot
    assert "| candidate |" in next(ln for ln in body if ln.startswith("| qqq_pc |"))
    assert "failed: AssertionError: 576 / 128" in body[-1] and body[-1].count("|") == lines[0].count("|")
    assert "Pick (per-channel; lowest val perplexity of the candidate rows): rot_gptq_pc: val 12.000 (+20.00%)" in table
    assert "eval 24.000 (+20.00%), lee 36.000 (+20.00%)." in table


def test_table_reads_old_single_split_files() -> None:
    old = {
        "protocol": "P",
        "rows": [{"row": "fp32", "label": "FP32", "ppl": 20.0}, {"row": "rtn_pc", "label": "RTN", "ppl": 30.0}],
    }
    table = accuracy._table(old)
    assert "| eval ppl | eval Δ |" in table and "| RTN |  | 30.000 | +50.00% |" in table and "| val ppl" not in table
