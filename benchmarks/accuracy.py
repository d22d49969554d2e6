"""Accuracy benchmark: perplexity of SmolLM2-135M under W4A8 methods, ours and peers'.

    python benchmarks/accuracy.py [--rows fp32,qqq_g128,...] [--n-calib 128] [--n-eval 40]
                                  [--out benchmarks/results/accuracy.json] [--threads 2]

Protocol: SmolLM2-135M-Instruct (``models.load_model("demo")``, dequantized from the
GGUF Q4_1 file, so its weights already sit on a 4-bit grid and quantization error is
understated). Text: the cleaned Wikipedia excerpt of the gensim wheel. Evaluation: the
last ``--n-eval`` windows of 512 tokens (BOS + 511) of the whole text; calibration:
``--n-calib`` windows drawn with seed 0 from the first 80% (``data.standard_splits``).
Perplexity is exp of the mean NLL over all predicted tokens of the evaluation windows.

Each row runs in a fresh subprocess (so peak RSS is that row's own) and is appended to
the JSON file as soon as it finishes; a markdown table is printed at the end (and
written next to the JSON). Quantized rows evaluate the *compiled* model (lowered
``torch.ops.qqq.w4a8_linear`` ops). Peer rows (llm-compressor, torchao) run in their
own virtual environments under ``benchmarks/peers/`` (create them with
``benchmarks/peers/setup.sh``) on the same token windows; they are skipped if absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"

# name: (label, preset, quant config, preset options)
OWN_ROWS: dict[str, tuple[str, str | None, dict, dict]] = {
    "fp32": ("FP32 (reference)", None, {}, {}),
    "rtn_pc": ("RTN W4A8 per-channel", "rtn", {"group_size": -1}, {}),
    "rtn_g128": ("RTN W4A8 g128", "rtn", {"group_size": 128}, {}),
    "smoothquant_pc": ("SmoothQuant + RTN W4A8 per-channel", "smoothquant", {"group_size": -1}, {}),
    "gptq_pc": ("GPTQ W4A8 per-channel", "gptq", {"group_size": -1}, {}),
    "gptq_g128": ("GPTQ W4A8 g128", "gptq", {"group_size": 128}, {}),
    "qqq_pc": ("QQQ W4A8 per-channel", "qqq", {"group_size": -1}, {}),
    "qqq_g128": ("QQQ W4A8 g128", "qqq", {"group_size": 128}, {}),
    "qqq_g128_fp16": (
        "QQQ W4A8 g128 (fp16 group scales)",
        "qqq",
        {"group_size": 128, "group_scale_dtype": "float16"},
        {},
    ),
    "qqq_rot_pc": ("QQQ + rotation W4A8 per-channel", "qqq", {"group_size": -1}, {"rotation": True}),
}
# name: (label, venv folder, runner script, runner arguments)
PEER_ROWS: dict[str, tuple[str, str, str, list[str]]] = {
    "llmc_gptq_pc": ("llm-compressor GPTQ W4A8 per-channel", "venv-llmc", "run_llmcompressor.py", ["--scheme", "gptq"]),
    "llmc_sq_gptq_pc": (
        "llm-compressor SmoothQuant+GPTQ W4A8 per-channel",
        "venv-llmc",
        "run_llmcompressor.py",
        ["--scheme", "smoothquant_gptq"],
    ),
    "torchao_8da4w_pc": ("torchao 8da4w per-channel", "venv-torchao", "run_torchao.py", ["--group-size", "-1"]),
    "torchao_8da4w_g64": ("torchao 8da4w g64", "venv-torchao", "run_torchao.py", ["--group-size", "64"]),
    "torchao_8da4w_g128": ("torchao 8da4w g128", "venv-torchao", "run_torchao.py", ["--group-size", "128"]),
}
DEFAULT_ROWS = [*OWN_ROWS, *PEER_ROWS]
DEFAULT_ROWS.remove("qqq_g128_fp16")  # on request: --rows qqq_g128_fp16

PROTOCOL = (
    "SmolLM2-135M-Instruct (demo model, dequantized from GGUF Q4_1: its weights already lie on a "
    "4-bit grid, so quantization error is understated). Wikipedia excerpt (gensim wheel). "
    "Eval: last {n_eval} windows of 512 tokens (BOS + 511); calibration: {n_calib} windows, seed 0, "
    "first 80% of the text. W4A8 = int4 weights (symmetric), dynamic per-token symmetric int8 "
    "activations; lm_head kept in float; group scales int8 two-level unless stated. "
    "Quantization time = capture + passes (wall, and CPU seconds of all threads), {threads} threads; "
    "peak RSS of the row's process."
)


# ----------------------------------------------------------------------------- child


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_own_row(name: str, data_path: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import qqq_compile as qc
    from qqq_compile.eval import perplexity
    from qqq_compile.models import load_model

    label, preset, quant, options = OWN_ROWS[name]
    data = torch.load(data_path)
    model, _ = load_model("demo")
    row: dict = {"row": name, "label": label}
    if preset is None:
        model_fn = model
        row["quant_s"] = None
    else:
        config = {"preset": preset, "quant": quant, "preset_options": options}
        t0, c0 = time.perf_counter(), _cpu_s()
        cm = qc.compile(model, list(data["calib"]), config, progress=False)
        row["quant_s"] = time.perf_counter() - t0
        # CPU seconds (all threads): robust to other processes sharing the machine.
        row["quant_cpu_s"] = _cpu_s() - c0
        row["passes"] = {p.name: round(p.seconds, 1) for p in cm.report.passes}
        row["notes"] = [f"{n.pass_name}: {n.message}" for n in cm.report.notes if n.level == "warning"][:10]
        row["w4a8_linears"] = sum(1 for li in cm.linears() if li.lowered)
        row["config"] = config
        model_fn = cm
        del model
    t0 = time.perf_counter()
    row["ppl"] = perplexity(model_fn, list(data["eval"]), batch_size=8, progress=False)
    row["eval_s"] = time.perf_counter() - t0
    row["peak_rss_mb"] = _rss_mb()
    return row


# ----------------------------------------------------------------------------- parent


def _prepare_data(n_calib: int, n_eval: int, path: Path) -> None:
    import torch

    from qqq_compile.data import standard_splits
    from qqq_compile.models import load_model

    _, tok = load_model("demo")
    calib, evals = standard_splits(tok, n_calib=n_calib, n_eval=n_eval)
    torch.save({"calib": torch.cat(calib), "eval": torch.cat(evals)}, path)


def _run_child(cmd: list[str], result: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": f"exit {proc.returncode}:\n" + "\n".join(tail), "row_wall_s": wall}
    out = json.loads(result.read_text())
    out["row_wall_s"] = wall
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a crash never leaves half a results file


def _table(results: dict, fp: float | None, protocol: str) -> str:
    lines = [
        "| row | perplexity | Δ vs FP32 | quantization wall (s) | quantization CPU (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate([*OWN_ROWS, *PEER_ROWS])}
    # the script's own row order, however the rows were (re-)run with --append
    for r in sorted(results["rows"], key=lambda r: order.get(r["row"], len(order))):
        if "error" in r:
            # the last line of a traceback is the message; "|" would break the table
            last = [ln for ln in r["error"].splitlines() if ln.strip()][-1:] or ["?"]
            lines.append(f"| {r['label']} | failed: {last[0][-160:].replace('|', '/')} | | | | |")
            continue
        delta = "" if fp is None or r["row"] == "fp32" else f"{100 * (r['ppl'] / fp - 1):+.2f}%"
        qs = "" if r.get("quant_s") is None else f"{r['quant_s']:.0f}"
        cpu = "" if r.get("quant_cpu_s") is None else f"{r['quant_cpu_s']:.0f}"
        rss = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {delta} | {qs} | {cpu} | {rss} |")
    return "\n".join([*lines, "", protocol])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list from {[*OWN_ROWS, *PEER_ROWS]}")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of an existing --out JSON (same protocol); re-run rows replace theirs",
    )
    ap.add_argument("--table", action="store_true", help="only re-render the table of an existing --out JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        row = run_own_row(args.child, args.data, args.threads)
        Path(args.result).write_text(json.dumps(row))
        return

    if args.table:
        results = json.loads(Path(args.out).read_text())
        table = _table(results, results.get("fp32_ppl"), results["protocol"])
        Path(args.out).with_suffix(".md").write_text(table + "\n")
        print(table)
        return

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in OWN_ROWS and r not in PEER_ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; choose from {list(OWN_ROWS) + list(PEER_ROWS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    protocol = PROTOCOL.format(n_eval=args.n_eval, n_calib=args.n_calib, threads=args.threads)
    results = {"protocol": protocol, "n_calib": args.n_calib, "n_eval": args.n_eval, "rows": []}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        if (old.get("n_calib"), old.get("n_eval")) != (args.n_calib, args.n_eval):
            was = f"{old.get('n_calib')}/{old.get('n_eval')}"
            sys.exit(f"--append: {out} was measured with another protocol ({was} calibration/evaluation windows)")
        results["rows"] = [r for r in old["rows"] if r["row"] not in rows]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="qqq_acc_") as tmp:
        data = Path(tmp) / "windows.pt"
        print(f"preparing windows ({args.n_calib} calibration, {args.n_eval} evaluation)...", flush=True)
        _prepare_data(args.n_calib, args.n_eval, data)
        for name in rows:
            result = Path(tmp) / f"{name}.json"
            if name in OWN_ROWS:
                cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--result", str(result)]
                cmd += ["--threads", str(args.threads)]
                label = OWN_ROWS[name][0]
            else:
                label, venv, script, extra = PEER_ROWS[name]
                python = PEERS / venv / "bin" / "python"
                if not python.exists():
                    print(f"[skip] {name}: {python} not found (run benchmarks/peers/setup.sh)", flush=True)
                    continue
                cmd = [str(python), str(PEERS / script), "--data", str(data), "--result", str(result)]
                cmd += ["--model", _demo_path(), "--threads", str(args.threads), *extra]
            print(f"[run ] {name}: {label}", flush=True)
            row = _run_child(cmd, result, env)
            row.setdefault("row", name)
            row.setdefault("label", label)
            results["rows"] = [r for r in results["rows"] if r["row"] != name] + [row]
            fp = next((r["ppl"] for r in results["rows"] if r["row"] == "fp32" and "ppl" in r), None)
            msg = row.get("error") or f"ppl {row['ppl']:.3f}" + (
                f" ({100 * (row['ppl'] / fp - 1):+.2f}% vs FP32)" if fp and name != "fp32" else ""
            )
            print(f"[done] {name}: {msg}  [{row['row_wall_s']:.0f} s]", flush=True)
            results["fp32_ppl"] = fp
            _write(out, json.dumps(results, indent=2))  # partial results survive a crash
    table = _table(results, results.get("fp32_ppl"), protocol)
    _write(out.with_suffix(".md"), table + "\n")
    print()
    print(table)


def _demo_path() -> str:
    from qqq_compile.models import demo_model_path

    return str(demo_model_path())


if __name__ == "__main__":
    main()
