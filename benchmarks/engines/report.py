"""Medians, ratios, the bytes-per-token floor and the markdown table of ``generate_speed.py``."""

from __future__ import annotations

import statistics
from typing import Any

BASELINES = {"llamacpp-q4_0": "llama.cpp Q4_0", "llamacpp-q4_1": "llama.cpp Q4_1", "hf-fp32": "HF fp32"}
METRICS = ("ttft_s", "prefill_tok_s", "decode_tok_s")


def _case_status(entry: dict[str, Any], case: str, rows: int, b1_ok: bool) -> str:
    if entry["status"] != "ok":
        return entry["status"]
    warm_error = entry["info"].get("case_errors", {}).get(case)
    if warm_error:
        # An engine that runs one row but not several "cannot batch": not a failure of the engine.
        return f"n/a: {warm_error}" if rows > 1 and b1_ok else f"failed: {warm_error}"
    if entry.get(f"error_{case}"):
        return f"failed: {entry[f'error_{case}']}"
    return "ok" if entry["runs"].get(case) else "failed: no completed run"


def summarize(engines: dict[str, Any], bandwidth: float | None) -> dict[str, Any]:
    """Per engine and case: medians over runs, ratios to the baselines, the memory floor."""
    out: dict[str, Any] = {"bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None, "engines": {}}
    for name, entry in engines.items():
        info = entry.get("info", {})
        wbytes = info.get("weight_bytes")
        eng = {"status": entry["status"], "weight_bytes": wbytes, "info": info, "cases": {}}
        read = info.get("decode_read_bytes") or wbytes  # an embedding table is read one row per token
        if read and bandwidth:
            # Decoding one step reads every weight once, whatever the row count.
            eng["floor_ms_per_step"] = 1e3 * read / bandwidth
        b1_ok = bool(entry["runs"].get("b1")) if "runs" in entry else False
        for case, runs in entry.get("runs", {}).items():
            rows = runs[0]["batch"] if runs else int(case[1:]) if case[1:].isdigit() else 1
            c: dict[str, Any] = {"status": _case_status(entry, case, rows, b1_ok), "rows": rows, "reps": len(runs)}
            if runs:
                for m in METRICS:
                    vals = [r[m] for r in runs if r.get(m) is not None]
                    c[m] = statistics.median(vals) if vals else None
                c["new_tokens"] = min(r["new_tokens"] for r in runs)
                c["loadavg"] = [r["loadavg_1m"] for r in runs if "loadavg_1m" in r]
                probes = [(r["int8_probe_ms"], r["ttft_s"]) for r in runs if r.get("int8_probe_ms")]
                if probes:
                    c["int8_probe_ms"] = [p for p, _ in probes]
                    # TTFT in units of the machine's int8 GEMM time at that turn: steadier than
                    # TTFT where the machine's speed drifts (generate_speed.Int8Probe).
                    c["ttft_per_probe"] = statistics.median(1e3 * t / p for p, t in probes)
                c["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
                decode = [r["decode_tok_s"] or 0.0 for r in runs]
                c["decode_spread"] = [min(decode), max(decode)]
                if eng.get("floor_ms_per_step"):
                    c["ceiling_tok_s"] = rows * 1e3 / eng["floor_ms_per_step"]
                    c["decode_of_ceiling"] = (c["decode_tok_s"] or 0) / c["ceiling_tok_s"]
            eng["cases"][case] = c
        out["engines"][name] = eng
    for eng in out["engines"].values():
        for case, c in eng["cases"].items():
            for base in BASELINES:
                ref = out["engines"].get(base, {}).get("cases", {}).get(case, {})
                for m in ("decode_tok_s", "prefill_tok_s"):
                    if c.get(m) and ref.get(m):
                        c.setdefault(f"{m}_vs", {})[base] = c[m] / ref[m]
    return out


def agreement(engines: dict[str, Any], reference: str = "hf-fp32", first: int = 16) -> dict[str, Any]:
    """Leading greedy tokens each engine shares with ``reference`` (first run of each case, per row)."""
    ref = engines.get(reference, {}).get("runs", {})
    out: dict[str, Any] = {"reference": reference, "first": first, "engines": {}}
    for name, entry in engines.items():
        if name == reference:
            continue
        for case, runs in entry.get("runs", {}).items():
            if not runs or not ref.get(case):
                continue
            per_row = []
            for mine, theirs in zip(runs[0]["tokens"], ref[case][0]["tokens"], strict=True):
                n = 0
                while n < min(first, len(mine), len(theirs)) and mine[n] == theirs[n]:
                    n += 1
                per_row.append(n)
            out["engines"].setdefault(name, {})[case] = {
                "leading_agree_per_row": per_row,
                "tokens_row0": runs[0]["tokens"][0][:first],
                "reference_row0": ref[case][0]["tokens"][0][:first],
            }
    return out


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return fmt.format(x) if x is not None else "–"


def _ratio(c: dict[str, Any], metric: str, base: str) -> str:
    r = c.get(f"{metric}_vs", {}).get(base)
    return f"{r:.2f}x" if r is not None else "–"


def render(summary: dict[str, Any], agree: dict[str, Any], meta: dict[str, Any]) -> str:
    cases = meta["cases"]
    bw = summary["bandwidth_gb_s"]
    reps = meta["args"]["reps"]
    lines = [
        f"## Generation speed: SmolLM2-135M-Instruct, greedy, {meta['args']['threads']} threads per engine, "
        f"median of {reps} round-robin runs, {meta['args'].get('settle_s', 0.0):g} s pause before each "
        f"({meta['started']})",
        "",
    ]
    for case, shape in cases.items():
        rows = shape["rows"]
        lines += [
            f"### {case}: {rows} x {shape['prompt_len']}-token prompt, {meta['args']['new_tokens']} new tokens"
            + (" (tok/s summed over rows)" if rows > 1 else ""),
            "",
        ]
        head = ["engine", "TTFT ms", "prefill tok/s", "decode tok/s"]
        head += [f"decode vs {v}" for v in BASELINES.values()] + [f"prefill vs {v}" for v in BASELINES.values()]
        head += ["weights MB", "floor tok/s", "decode / floor", "peak RSS MB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, eng in summary["engines"].items():
            c = eng["cases"].get(case)
            if c is None:
                continue
            if c["status"] != "ok":
                reason = c["status"].replace("|", "/").replace("\n", " ")
                lines.append(f"| {name} | {reason[:300]} |" + " |" * (len(head) - 2))
                continue
            cells = [
                name,
                _f(c["ttft_s"] * 1e3, "{:.0f}"),
                _f(c["prefill_tok_s"], "{:.0f}"),
                _f(c["decode_tok_s"]),
                *[_ratio(c, "decode_tok_s", b) for b in BASELINES],
                *[_ratio(c, "prefill_tok_s", b) for b in BASELINES],
                _f(eng["weight_bytes"] / 1e6 if eng["weight_bytes"] else None, "{:.0f}"),
                _f(c.get("ceiling_tok_s")),
                _f(100 * c["decode_of_ceiling"] if c.get("decode_of_ceiling") is not None else None, "{:.0f}%"),
                _f(c["peak_rss_mb"], "{:.0f}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"Bytes-per-token floor: weight bytes read per decode step / memory read bandwidth "
        f"{_f(bw, '{:.1f}')} GB/s (torch sum over 1 GiB, {meta['args']['threads']} threads, same run); "
        "floor tok/s is that bound (x rows for a batch). Weights: compiled.weight_bytes() for ours (less "
        "embedding tables a step reads one row of), unique "
        "parameter bytes for HF, the file size for a GGUF. The demo model is the Q4_1 GGUF dequantized, so HF "
        "runs the very weights llama.cpp Q4_1 runs.",
        "",
    ]
    for name, eng in summary["engines"].items():
        types = eng["info"].get("gguf_tensor_types")
        if types:
            lines.append(f"{name} GGUF tensor types: {', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}")
    loads = [r for eng in summary["engines"].values() for c in eng["cases"].values() for r in c.get("loadavg", [])]
    if loads:
        lines.append(f"1-min load average during the runs: {min(loads):.1f}-{max(loads):.1f} (2 cores, shared machine)")
    probed = [
        (n, case, c)
        for n, eng in summary["engines"].items()
        for case, c in eng["cases"].items()
        if c.get("int8_probe_ms")
    ]
    if probed:
        lines.append(
            f"int8 GEMM probe before each turn ({meta.get('probe') or 'a fixed int8 GEMM'}; the machine's rate "
            "then), median (range) ms and median TTFT / probe: "
            + "; ".join(
                f"{n} {case} {statistics.median(c['int8_probe_ms']):.1f} "
                f"({min(c['int8_probe_ms']):.1f}-{max(c['int8_probe_ms']):.1f}), {c['ttft_per_probe']:.2f}"
                for n, case, c in probed
            )
        )
    lines.append("")
    ref = agree["reference"]
    for name, per_case in agree["engines"].items():
        for case, a in per_case.items():
            rows = a["leading_agree_per_row"]
            lines.append(
                f"greedy agreement {name} vs {ref} ({case}): leading tokens equal per row {rows} of {agree['first']}"
                + ("" if min(rows) == agree["first"] else f"; row 0 {a['tokens_row0']} vs {a['reference_row0']}")
            )
    return "\n".join(lines)
