"""GGUF: our Q4_0 file against llama.cpp's own quantizer on SmolLM2-135M, all run by llama.cpp.

    python benchmarks/gguf_vs_llamacpp.py [--rows ROW,...] [--n-calib 128] [--n-eval 40] [--n-lee 40]
                                          [--threads 2] [--decode-tokens 64] [--decode-rounds 3]
                                          [--out benchmarks/results/gguf_vs_llamacpp.json] [--table]

Rows (``--rows``, default all, in this order):

* ``f32``: the shipped file dequantized to F32 by llama.cpp (``llama_model_quantize``, ALL_F32):
  the float reference every Δ is measured against, in llama.cpp's own arithmetic.
* ``q4_0``, ``q4_1``, ``q4_k_m``: llama.cpp's quantizer on that model (``q4_1`` is the shipped
  file itself; the others are requantized from it, as ``benchmarks/engines/llamacpp.py`` does).
* ``rtn``, ``gptq``, ``gptq_clip``, ``gptq_clip_asym``, ``default``: ours, compiled with
  ``quant.target="gguf"`` and exported: round to nearest on the Q4_0 grid; + GPTQ; + its clip
  search; + GPTAQ's asymmetric calibration; + the rotation (= the default preset ``qqq_rot``).
  Each also reports our own perplexity of the compiled graph (Q4_0 weights, Q8_0 activations)
  next to llama.cpp's on the file.

Protocol (the project's, ``benchmarks/accuracy.py``): windows of 512 tokens, BOS + 511; eval: the
last ``--n-eval`` windows of the Wikipedia excerpt; lee: ``--n-lee`` windows drawn with seed 0
from gensim's Lee corpus; calibration: ``--n-calib`` windows, seed 0, first 80% of Wikipedia.
Perplexity = exp(mean NLL of tokens 1..511) over the windows, the same token ids fed to llama.cpp
(its tokenizer is not involved). Decode speed: greedy tokens/s of llama.cpp (``--threads``
threads) after a 32-token prompt, each file timed ``--decode-rounds`` times round-robin; the
median, and its ratio to llama.cpp's Q4_0 timed in the same rounds.

Needs the llama.cpp environment (``benchmarks/peers/setup.sh llamacpp``). Files are cached under
the qqq_compile cache (``gguf_bench/``). JSON goes to ``--out`` after every row, the markdown
table next to it (``--table`` re-renders it from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LLAMACPP_ROWS = {"f32": "ALL_F32", "q4_0": "MOSTLY_Q4_0", "q4_1": None, "q4_k_m": "MOSTLY_Q4_K_M"}
_ROT = {"name": "rotate", "options": {"online_down_proj": False}}
_RTN, _LOWER = {"name": "quantize_rtn"}, {"name": "lower"}


def _gptq(**options) -> dict:
    return {"name": "gptq", "options": options}


OUR_ROWS = {
    "rtn": [_RTN, _LOWER],
    "gptq": [_gptq(), _RTN, _LOWER],
    "gptq_clip": [_gptq(clip_search=True), _RTN, _LOWER],
    "gptq_clip_asym": [_gptq(clip_search=True, asym=True), _RTN, _LOWER],
    "default": None,  # the default preset (qqq_rot), as `qqq-compile quantize --target gguf` runs it
}
LABELS = {
    "f32": "llama.cpp F32 (the float model)",
    "q4_0": "llama.cpp Q4_0",
    "q4_1": "llama.cpp Q4_1 (the shipped file)",
    "q4_k_m": "llama.cpp Q4_K_M",
    "rtn": "ours: RTN on the Q4_0 grid",
    "gptq": "ours: + GPTQ",
    "gptq_clip": "ours: + clip search",
    "gptq_clip_asym": "ours: + GPTAQ",
    "default": "ours: + rotation (default preset)",
}
CAVEAT = (
    "Caveat: SmolLM2's weights come from a Q4_1 GGUF (the demo model is that file dequantized), so they "
    "already sit on a 4-bit grid: llama.cpp's Q4_1 of it is lossless by construction, and every other "
    "row's error is understated."
)


def _llamacpp(path: Path, tasks: list[dict], threads: int) -> list[dict]:
    from qqq_compile.targets.gguf.llamacpp import run_llamacpp

    return run_llamacpp(path, tasks, threads=threads, n_ctx=512)


def _requantize(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's quantizer (benchmarks/engines/llamacpp.py's ``requantize``, cached), run in its venv."""
    from qqq_compile.targets.gguf.llamacpp import llamacpp_python

    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import llama_cpp; "
        "from engines.llamacpp import requantize; "
        f"requantize(__import__('pathlib').Path({str(src)!r}), __import__('pathlib').Path({str(dst)!r}), "
        f"llama_cpp.LLAMA_FTYPE_{ftype}, {threads})"
    )
    subprocess.run([str(llamacpp_python()), "-c", code], check=True, capture_output=True)
    return dst


def _ppl(nll: float, tokens: int) -> float:
    import math

    return math.exp(nll / tokens)


def measure_file(path: Path, windows: dict, threads: int) -> dict:
    tasks = [{"op": "nll", "windows": [w[0].tolist() for w in windows[s]]} for s in ("eval", "lee")]
    t0 = time.perf_counter()
    res = _llamacpp(path, tasks, threads)
    return {
        "file_mb": path.stat().st_size / 1e6,
        "ppl_eval": _ppl(res[0]["nll"], res[0]["tokens"]),
        "ppl_lee": _ppl(res[1]["nll"], res[1]["tokens"]),
        "llamacpp_eval_s": time.perf_counter() - t0,
    }


def our_row(name: str, model, tok, windows: dict, path: Path, threads: int) -> dict:
    import torch

    import qqq_compile as qc
    from qqq_compile.eval import perplexity

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    compiled = qc.compile(model, windows["calib"], {"quant": {"target": "gguf"}}, passes=OUR_ROWS[name])
    quant_s = time.perf_counter() - t0
    compiled.target.export("gguf", compiled, path, tokenizer=tok, overwrite=True)
    out = {"quant_wall_s": quant_s, **measure_file(path, windows, threads)}
    for split in ("eval", "lee"):
        out[f"ours_{split}"] = perplexity(compiled, windows[split], batch_size=4)
        out[f"agree_{split}_pct"] = 100 * (out[f"ppl_{split}"] / out[f"ours_{split}"] - 1)
    return out


def head_choice(model, windows: dict, threads: int) -> dict:
    """The head / embedding type's own cost: the float model with only ``gguf_head`` (Q8_0 or
    F16 tables), our perplexity on the eval and lee windows, and the tables' bytes."""
    import torch

    import qqq_compile as qc
    from qqq_compile.eval import perplexity

    torch.set_num_threads(threads)
    out = {}
    for fmt in ("q8_0", "f16"):
        passes = [{"name": "gguf_head", "options": {"head": fmt, "embedding": fmt}}]
        compiled = qc.compile(model, windows["calib"][:1], {"quant": {"target": "gguf"}}, passes=passes)
        row = {f"ours_{split}": perplexity(compiled, windows[split], batch_size=4) for split in ("eval", "lee")}
        tables = [t for n, t in compiled.graph_module.named_buffers() if n.rsplit(".", 1)[-1].startswith(f"{fmt}_")]
        row["table_mb"] = sum(t.numel() * t.element_size() for t in tables) / 1e6
        out[fmt] = row
        print(f"[gguf_vs_llamacpp] head/embedding {fmt}: {row}", flush=True)
    return out


def decode_speed(files: dict[str, Path], args: argparse.Namespace, prompt: list[int]) -> dict[str, dict]:
    times: dict[str, list[float]] = {k: [] for k in files}
    n = args.decode_tokens
    for _ in range(args.decode_rounds):
        for name, path in files.items():
            (res,) = _llamacpp(path, [{"op": "generate", "ids": prompt, "n": n}], args.threads)
            times[name].append((n - 1) / res["decode_s"])
    base = statistics.median(times["q4_0"]) if "q4_0" in times else None
    return {
        k: {"decode_tok_s": statistics.median(v), "decode_vs_q4_0": statistics.median(v) / base if base else None}
        for k, v in times.items()
    }


# ----------------------------------------------------------------------------- table


def _pct(x: float | None, ref: float | None) -> str:
    return "" if x is None or not ref else f"{100 * (x / ref - 1):+.2f}%"


def render(data: dict) -> str:
    rows = data["rows"]
    ref = rows.get("f32", {})
    head = (
        "| row | file (MB) | eval ppl (llama.cpp) | Δ | lee ppl (llama.cpp) | Δ | ours eval / lee (our graph) "
        "| llama.cpp vs ours | decode tok/s | vs Q4_0 |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name in [*LLAMACPP_ROWS, *OUR_ROWS]:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error'][:120]} |||||||||")
            continue
        ours = f"{r['ours_eval']:.3f} / {r['ours_lee']:.3f}" if "ours_eval" in r else ""
        agree = f"{r['agree_eval_pct']:+.2f}% / {r['agree_lee_pct']:+.2f}%" if "agree_eval_pct" in r else ""
        speed = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else ""
        ratio = f"{r['decode_vs_q4_0']:.2f}x" if r.get("decode_vs_q4_0") else ""
        lines.append(
            f"| {LABELS[name]} | {r['file_mb']:.1f} | {r['ppl_eval']:.3f} | {_pct(r['ppl_eval'], ref.get('ppl_eval'))} "
            f"| {r['ppl_lee']:.3f} | {_pct(r['ppl_lee'], ref.get('ppl_lee'))} | {ours} | {agree} | {speed} | {ratio} |"
        )
    return head + "\n".join(lines) + "\n\n" + data["protocol"] + "\n\n" + CAVEAT + "\n\n" + verdict(rows) + "\n"


def verdict(rows: dict) -> str:
    """The issue's acceptance checks on the rows present."""
    out = []
    f32, q40, ours = rows.get("f32"), rows.get("q4_0"), rows.get("default")
    if f32 and q40 and ours and "error" not in ours:
        for s in ("eval", "lee"):
            loss_ours, loss_q40 = ours[f"ppl_{s}"] / f32[f"ppl_{s}"] - 1, q40[f"ppl_{s}"] / f32[f"ppl_{s}"] - 1
            mark = "PASS" if loss_ours <= loss_q40 / 2 else "FAIL"
            out.append(f"{s}: ours loses {100 * loss_ours:+.2f}%, Q4_0 {100 * loss_q40:+.2f}% -> {mark}")
        mark = "PASS" if ours["file_mb"] <= 1.05 * q40["file_mb"] else "FAIL"
        out.append(f"size: {ours['file_mb']:.1f} MB vs Q4_0 {q40['file_mb']:.1f} MB (+5%) -> {mark}")
    for name in OUR_ROWS:
        r = rows.get(name)
        if r and "agree_eval_pct" in r:
            worst = max(abs(r["agree_eval_pct"]), abs(r["agree_lee_pct"]))
            out.append(f"{name}: llama.cpp vs our graph within {worst:.2f}% -> {'PASS' if worst <= 1 else 'FAIL'}")
    return "Checks: " + "; ".join(out) if out else ""


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for p, text in ((path, json.dumps(data, indent=2)), (path.with_suffix(".md"), render(data))):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join([*LLAMACPP_ROWS, *OUR_ROWS]))
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--n-lee", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gguf_vs_llamacpp.json")
    ap.add_argument("--table", action="store_true", help="re-render the markdown table from --out and exit")
    ap.add_argument(
        "--head-choice",
        action="store_true",
        help="also measure the head/embedding type (Q8_0 vs F16) on the float model, our perplexity",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="rows --out already holds (without an error) keep their perplexities; their files still join "
        "the decode timing (a resumed run)",
    )
    args = ap.parse_args(argv)
    if args.table:
        print(render(json.loads(args.out.read_text())))
        return 0
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in LLAMACPP_ROWS and r not in OUR_ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join([*LLAMACPP_ROWS, *OUR_ROWS])}")

    from qqq_compile.data import cache_root, lee_text, standard_splits, token_windows
    from qqq_compile.models import demo_gguf_path, load_model
    from qqq_compile.targets.gguf.llamacpp import llamacpp_python

    if llamacpp_python() is None:
        print("the llama.cpp environment is missing: run benchmarks/peers/setup.sh llamacpp", file=sys.stderr)
        return 2
    model, tok = load_model("demo")
    calib, evals = standard_splits(tok, n_calib=args.n_calib, n_eval=args.n_eval)
    windows = {"calib": calib, "eval": evals, "lee": token_windows(tok, lee_text(), 512, n=args.n_lee, seed=0)}
    protocol = (
        f"SmolLM2-135M-Instruct. Perplexity by llama.cpp (llama-cpp-python, CPU, {args.threads} threads) on "
        f"{args.n_eval} eval windows (last of the Wikipedia excerpt) and {args.n_lee} lee windows, 512 tokens "
        f"each (BOS + 511); ours calibrated on {args.n_calib} windows; 'ours (our graph)': our perplexity of "
        "the compiled model (Q4_0 weights, Q8_0 activations) on the same windows. Δ vs the F32 row. Decode: "
        f"greedy tok/s after a 32-token prompt, {args.decode_tokens} tokens, median of {args.decode_rounds} "
        "round-robin rounds."
    )
    data = {"protocol": protocol, "args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    if args.out.is_file():
        data["rows"] = json.loads(args.out.read_text()).get("rows", {})
    cache = cache_root() / "gguf_bench"
    cache.mkdir(parents=True, exist_ok=True)
    shipped = demo_gguf_path()
    files: dict[str, Path] = {}
    for name in rows:
        print(f"[gguf_vs_llamacpp] {name}", flush=True)
        try:
            kept = data["rows"].get(name, {})
            if args.keep and kept.get("file") and "error" not in kept and Path(kept["file"]).is_file():
                files[name] = Path(kept["file"])
                continue
            if name in LLAMACPP_ROWS:
                ftype = LLAMACPP_ROWS[name]
                path = shipped if ftype is None else cache / f"SmolLM2-135M-{name.upper()}-from-Q4_1.gguf"
                if ftype is not None and not path.is_file():
                    _requantize(shipped, path, ftype, args.threads)
                data["rows"][name] = measure_file(path, windows, args.threads)
            else:
                path = cache / f"ours-{name}-c{args.n_calib}.gguf"
                data["rows"][name] = our_row(name, model, tok, windows, path, args.threads)
            files[name] = path
            data["rows"][name]["file"] = str(path)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            data["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
        _write(args.out, data)
    if args.head_choice:
        data["head_choice"] = head_choice(model, windows, args.threads)
        _write(args.out, data)
    prompt = windows["eval"][0][0, :32].tolist()
    for name, speed in decode_speed(files, args, prompt).items():
        data["rows"][name].update(speed)
    _write(args.out, data)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
