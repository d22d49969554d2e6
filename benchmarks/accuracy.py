"""Accuracy benchmark: perplexity of SmolLM2-135M under W4A8 methods, ours and peers'.

    python benchmarks/accuracy.py [--rows fp32,qqq_g128,rot_gptq_g128:w4a16,...]
                                  [--extra-row NAME=JSON ...] [--splits val,eval,lee]
                                  [--n-calib 128] [--n-eval 40] [--n-val N] [--n-lee N]
                                  [--out benchmarks/results/accuracy.json] [--threads 2]
                                  [--append] [--table]

Protocol: SmolLM2-135M-Instruct (``models.load_model("demo")``, dequantized from the
GGUF Q4_1 file, so its weights already sit on a 4-bit grid and quantization error is
understated). Every window is 512 tokens (BOS + 511). Three splits, each evaluated in
the row's process after one quantization (``--splits`` picks which):

* ``val``: ``--n-val`` (default ``--n-eval``) windows drawn with seed 0 from 80-90% of the
  Wikipedia excerpt (``data.protocol_splits``). Choices (the default preset, its
  options) are made on this split only.
* ``eval``: the last ``--n-eval`` windows of the same text, the project's evaluation
  windows; report them for the pick.
* ``lee``: ``--n-lee`` (default ``--n-eval``) windows drawn with seed 0 from gensim's Lee
  news corpus (``data.lee_text``): another domain, never used for a choice.

Calibration: ``--n-calib`` windows drawn with seed 0 from the first 80% of the
Wikipedia text; no window of one split shares a token with another's (tested in
``tests/test_data.py``). Perplexity is exp of the mean NLL over all predicted tokens.

Rows are data (``accuracy_rows.Row``: label, preset, QuantConfig dict, preset options, or
an explicit pass list; a mode). ``NAME:MODE`` derives a row that splits the error of row
NAME: ``w4a16`` (weights only), ``w16a8`` (activations only), ``fake`` (W4A8 by fake
quantization, to check the split); see ``accuracy_rows``. Rows from the command line:

    --extra-row 'rot_clip={"preset": "qqq", "quant": {"group_size": 128},
                 "options": {"rotation": true, "smoothing": null, "gptq_options": {"damp": 0.05}}}'
    --extra-row 'rot_noh={"passes": [{"name": "rotate", "options": {"online_down_proj": false}},
                 {"name": "gptq"}, {"name": "quantize_rtn"}, {"name": "lower"}], "quant": {"group_size": -1}}'

(JSON keys: ``label`` (default NAME), ``preset``, ``quant``, ``options``, ``passes``,
``mode``, ``candidate``.) Extra rows run after the built-in ones unless ``--rows`` names
them (``--rows fp32,rot_clip,rot_clip:w4a16``); they are candidates for the pick.

Columns: perplexity and Δ vs the FP32 row per split; bits per weight of the quantized
linears, scales included (32: float32 weights); quantization wall and CPU seconds
(capture + passes); peak RSS of the row's process. Below the table, one "pick" line per
weight format: the candidate row (own W4A8 rows) with the lowest val perplexity, with
its eval and lee figures.

Each row runs in a fresh subprocess (so peak RSS is that row's own) and is appended to
the JSON file as soon as it finishes; the markdown table is printed at the end and
written next to the JSON (``--table`` re-renders it from the JSON alone). Quantized
W4A8 rows evaluate the *compiled* model (lowered ``torch.ops.qqq.w4a8_linear`` ops). Peer
rows (llm-compressor, torchao) run in their own virtual environments under
``benchmarks/peers/`` (create them with ``benchmarks/peers/setup.sh``) on the same token
windows and splits; they are skipped if absent.
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
sys.path.insert(0, str(HERE))  # accuracy_rows, also in the child processes

from accuracy_rows import (  # noqa: E402
    DEFAULT_ROWS,
    MODES,
    OWN_ROWS,
    PEER_ROWS,
    SPLITS,
    Row,
    parse_extra_row,
    resolve_row,
)

PROTOCOL = (
    "SmolLM2-135M-Instruct (demo model, dequantized from GGUF Q4_1: its weights already lie on a "
    "4-bit grid, so quantization error is understated). Text: the Wikipedia excerpt of the gensim wheel. "
    "val: {n_val} windows of 512 tokens (BOS + 511) drawn with seed 0 from 80-90% of the text, used to "
    "choose; eval: the last {n_eval} windows, reported for the pick; calibration: {n_calib} windows, "
    "seed 0, first 80% (the three never share a token). lee: {n_lee} windows drawn with seed 0 from "
    "gensim's Lee news corpus (another domain, never used for a choice). W4A8 = int4 weights "
    "(symmetric), dynamic per-token symmetric int8 activations; lm_head kept in float; group scales "
    "int8 two-level unless stated. W4A16 / W16A8 rows split the error (fake quantization of one side "
    "of the same pipeline's linears). Bits per weight: the quantized linears, scales included. "
    "Quantization time = capture + passes (wall, and CPU seconds of all threads), {threads} threads; "
    "peak RSS of the row's process (evaluation included)."
)


# ----------------------------------------------------------------------------- parent


def _prepare_data(args: argparse.Namespace, splits: list[str], path: Path) -> None:
    import torch

    from qqq_compile.data import lee_text, protocol_splits, standard_splits, token_windows
    from qqq_compile.models import load_model

    _, tok = load_model("demo")
    if "val" in splits:
        calib, val, evals = protocol_splits(tok, n_calib=args.n_calib, n_eval=args.n_eval, n_val=args.n_val)
    else:
        (calib, evals), val = standard_splits(tok, n_calib=args.n_calib, n_eval=args.n_eval), []
    windows = {"calib": calib, "val": val, "eval": evals}
    if "lee" in splits:
        windows["lee"] = token_windows(tok, lee_text(), 512, n=args.n_lee, select="random", seed=0)
    # calib always travels (quantized rows need it); of the others only the chosen splits
    torch.save({k: torch.cat(v) for k, v in windows.items() if k == "calib" or k in splits}, path)


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


def _ppl(r: dict) -> dict[str, float]:
    """A row's perplexities by split (files written before the splits held one float: eval)."""
    p = r.get("ppl")
    return {"eval": p} if isinstance(p, (int, float)) else dict(p or {})


def _fp32(results: dict) -> dict[str, float]:
    return next((_ppl(r) for r in results["rows"] if r["row"] == "fp32" and "ppl" in r), {})


def _delta(ppl: float | None, ref: float | None) -> str:
    return "" if ppl is None or not ref else f"{100 * (ppl / ref - 1):+.2f}%"


def _is_candidate(r: dict) -> bool:
    return "spec" in r and "error" not in r and Row.from_dict(r["spec"]).is_candidate


def picks(results: dict) -> dict[str, dict]:
    """The candidate row with the lowest val perplexity, per weight format."""
    best: dict[str, dict] = {}
    for r in results["rows"]:
        val = _ppl(r).get("val")
        if val is None or not _is_candidate(r) or not r.get("w4a8_linears"):
            continue  # a pick is a W4A8 model: rows with no W4A8 linear never compete
        fmt = r.get("format", "?")
        if fmt not in best or val < _ppl(best[fmt])["val"]:
            best[fmt] = r
    return best


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _table(results: dict) -> str:
    fp = _fp32(results)
    rows = results["rows"]
    splits = [s for s in SPLITS if any(s in _ppl(r) for r in rows)]
    chosen = {r["row"] for r in picks(results).values()}
    head = ["row", "pick"] + [f"{s} {c}" for s in splits for c in ("ppl", "Δ")]
    head += ["bits/weight", "quantization wall (s)", "quantization CPU (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Built-in rows, then extra rows (in the order first run), then peers; a derived
    # BASE:MODE row right after its base. Whatever order --append re-ran them in.
    extras = [n for n in results.get("order", []) if ":" not in n and n not in OWN_ROWS and n not in PEER_ROWS]
    order = {name: i for i, name in enumerate([*OWN_ROWS, *extras, *PEER_ROWS])}

    def key(r: dict) -> tuple[int, int]:
        base, _, mode = r["row"].partition(":")
        return order.get(base, len(order)), MODES.index(mode) + 1 if mode in MODES else 0

    for r in sorted(rows, key=key):
        if "error" in r:
            # the last line of a traceback is the message; "|" would break the table
            last = [ln for ln in r["error"].splitlines() if ln.strip()][-1:] or ["?"]
            lines.append(f"| {r['label']} | | failed: {last[0][-160:].replace('|', '/')} |" + " |" * (len(head) - 3))
            continue
        mark = "**pick**" if r["row"] in chosen else ("candidate" if _is_candidate(r) else "")
        cells = [r["label"], mark]
        for s in splits:
            p = _ppl(r).get(s)
            cells += [_num(p, ".3f"), "" if r["row"] == "fp32" else _delta(p, fp.get(s))]
        cells += [_num(r.get("bits_per_weight"), ".3f")]
        cells += [_num(r.get(k), ".0f") for k in ("quant_s", "quant_cpu_s", "peak_rss_mb")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for fmt, r in picks(results).items():
        figs = ", ".join(
            f"{s} {_ppl(r)[s]:.3f} ({_delta(_ppl(r)[s], fp.get(s)) or 'no FP32 row'})" for s in splits if s in _ppl(r)
        )
        lines.append(f"Pick ({fmt}; lowest val perplexity of the candidate rows): {r['label']}: {figs}.")
    return "\n".join([*lines, "", results["protocol"]])


def _extra_rows(specs: list[str]) -> dict[str, Row]:
    extra: dict[str, Row] = {}
    for text in specs:
        try:
            name, row = parse_extra_row(text)
        except ValueError as e:
            sys.exit(str(e))
        if name in OWN_ROWS or name in PEER_ROWS:
            sys.exit(f"--extra-row {name}: that name is a built-in row; choose another")
        extra[name] = row
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma list of row names (default: the built-in rows, then extras)")
    ap.add_argument("--extra-row", action="append", default=[], metavar="NAME=JSON", help="add a row (see above)")
    ap.add_argument("--splits", default=",".join(SPLITS), help=f"comma list from {list(SPLITS)}")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--n-val", type=int, default=None, help="validation windows (default: --n-eval)")
    ap.add_argument("--n-lee", type=int, default=None, help="Lee news windows (default: --n-eval)")
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of an existing --out JSON (same protocol); re-run rows replace theirs",
    )
    ap.add_argument("--table", action="store_true", help="only re-render the table of an existing --out JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--row-json", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.n_val = args.n_eval if args.n_val is None else args.n_val
    args.n_lee = args.n_eval if args.n_lee is None else args.n_lee

    if args.child:
        from accuracy_rows import run_own_row

        row = run_own_row(args.child, Row.from_dict(json.loads(args.row_json)), args.data, args.threads)
        Path(args.result).write_text(json.dumps(row))
        return

    out = Path(args.out)
    if args.table:
        results = json.loads(out.read_text())
        table = _table(results)
        _write(out.with_suffix(".md"), table + "\n")
        print(table)
        return

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        sys.exit(f"--splits {args.splits!r}: choose a comma list from {list(SPLITS)}")
    own = {**OWN_ROWS, **_extra_rows(args.extra_row)}
    names = args.rows.split(",") if args.rows else [*DEFAULT_ROWS, *(n for n in own if n not in OWN_ROWS)]
    names = [n.strip() for n in names if n.strip()]
    rows: dict[str, Row] = {}
    for n in names:
        if n in PEER_ROWS:
            continue
        try:
            rows[n] = resolve_row(n, own)
        except KeyError:
            sys.exit(f"unknown row {n!r}; choose from {[*own, *PEER_ROWS]} (or NAME:MODE, or --extra-row)")
        except ValueError as e:
            sys.exit(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = {"n_calib": args.n_calib, "n_eval": args.n_eval, "n_val": args.n_val, "n_lee": args.n_lee}
    protocol = PROTOCOL.format(threads=args.threads, **sizes)
    results = {"protocol": protocol, **sizes, "rows": []}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        if any(old.get(k) != v for k, v in sizes.items()):
            was = {k: old.get(k) for k in sizes}
            sys.exit(f"--append: {out} was measured with other window counts ({was}, now {sizes})")
        results["rows"] = [r for r in old["rows"] if r["row"] not in names]
        results["order"] = [n for n in old.get("order", []) if n not in names]
    results["order"] = [*results.get("order", []), *names]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="qqq_acc_") as tmp:
        data = Path(tmp) / "windows.pt"
        print(f"preparing windows ({sizes}, splits {splits})...", flush=True)
        _prepare_data(args, splits, data)
        for name in names:
            result = Path(tmp) / f"{name.replace(':', '_')}.json"
            if name in rows:
                cmd = [sys.executable, __file__, "--child", name, "--row-json", json.dumps(rows[name].to_dict())]
                cmd += ["--data", str(data), "--result", str(result), "--threads", str(args.threads)]
                label = rows[name].label
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
            fp = _fp32(results)
            msg = row.get("error") or ", ".join(
                f"{s} {p:.3f}" + (f" ({_delta(p, fp.get(s))})" if fp.get(s) and name != "fp32" else "")
                for s, p in _ppl(row).items()
            )
            print(f"[done] {name}: {msg}  [{row['row_wall_s']:.0f} s]", flush=True)
            _write(out, json.dumps(results, indent=2))  # partial results survive a crash
    table = _table(results)
    _write(out.with_suffix(".md"), table + "\n")
    print()
    print(table)


def _demo_path() -> str:
    from qqq_compile.models import demo_model_path

    return str(demo_model_path())


if __name__ == "__main__":
    main()
