"""Long-run check: quantize and evaluate SmolLM2 several times in one process.

Each run compiles the real SmolLM2-135M (QQQ preset: smoothing + GPTQ, when the passes
exist; else round-to-nearest) on the first ``--calib`` calibration windows and measures
perplexity on ``--eval`` evaluation windows (standard splits: BOS + 511 Wikipedia tokens
per window). After each run the compiled model is dropped and the process's resident
memory (RSS) is read. The check passes when

* every run gives the identical perplexity (determinism across runs in one process);
* every compiled model is freed once dropped (no reference cycles kept alive);
* RSS does not grow between the second and the last run by more than 5 % or 50 MB,
  whichever is larger (the first run pays one-off costs: imports, kernel builds, caches).

``tracemalloc`` peaks count only Python-heap allocations (tensor storage is allocated
outside it); tracing also slows Python-heavy passes, so ``--no-tracemalloc`` times runs
without it. Wall times on a shared machine vary; CPU seconds (all threads) are steadier.
Note: the demo weights come from a Q4_1 GGUF, so they already sit on a 4-bit
grid and quantization error is understated.

    python benchmarks/longrun.py                      # 3 runs, 16 calib / 8 eval windows
    python benchmarks/longrun.py --runs 5 --calib 128 --eval 40 --preset qqq
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
import weakref

import torch

MB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the resident memory of this process (install psutil)")


def default_preset() -> str:
    """``qqq`` when its smoothing and GPTQ passes are importable, else ``rtn``."""
    try:
        from qqq_compile.compiler.passes import gptq, smooth  # noqa: F401
        from qqq_compile.compiler.presets import get_preset

        get_preset("qqq")
        return "qqq"
    except (ImportError, KeyError):
        return "rtn"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (standard protocol: 128)")
    ap.add_argument("--eval", type=int, default=8, help="evaluation windows (standard protocol: 40)")
    ap.add_argument("--preset", default=None, help="compile preset (default: qqq if available, else rtn)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-tracemalloc", action="store_true", help="do not trace Python allocations")
    ap.add_argument("--growth-pct", type=float, default=5.0)
    ap.add_argument("--growth-mb", type=float, default=50.0)
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error("--runs must be at least 2 (memory growth is measured between the last two runs)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import qqq_compile as qc
    from qqq_compile.data import standard_splits
    from qqq_compile.eval import perplexity
    from qqq_compile.models import load_model

    preset = args.preset or default_preset()
    model, tokenizer = load_model("demo")
    calib_all, eval_windows = standard_splits(tokenizer, n_calib=max(args.calib, 1), n_eval=args.eval)
    calib = calib_all[: args.calib]
    config = {"preset": preset, "calib": {"batch_size": args.batch_size}}
    print(
        f"SmolLM2-135M, preset {preset}, {len(calib)} calibration / {len(eval_windows)} evaluation windows of "
        f"{eval_windows[0].shape[1]} tokens (BOS first), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    float_ppl = perplexity(model, eval_windows, batch_size=args.batch_size, progress=False)
    rows = []
    rss_start = rss_bytes()
    for run in range(1, args.runs + 1):
        if not args.no_tracemalloc:
            tracemalloc.start()
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = qc.compile(model, calib, config, progress=False)
        t1, c1 = time.perf_counter(), time.process_time()
        ppl = perplexity(compiled, eval_windows, batch_size=args.batch_size, progress=False)
        t2 = time.perf_counter()
        peak = tracemalloc.get_traced_memory()[1] if not args.no_tracemalloc else None
        tracemalloc.stop()
        ref = weakref.ref(compiled)
        del compiled
        gc.collect()
        rows.append(
            {
                "run": run,
                "compile_s": t1 - t0,
                "compile_cpu_s": c1 - c0,
                "eval_s": t2 - t1,
                "ppl": ppl,
                "rss": rss_bytes(),
                "py_peak": peak,
                "freed": ref() is None,
            }
        )
        r = rows[-1]
        print(
            f"run {run}: compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.0f} CPU s), eval {r['eval_s']:.1f} s, "
            f"ppl {ppl:.6f}, RSS {r['rss'] / MB:.0f} MB",
            flush=True,
        )

    print()
    print(f"float model perplexity: {float_ppl:.4f}; RSS before the first run: {rss_start / MB:.0f} MB")
    print("| run | compile s (CPU s) | eval s | perplexity | RSS after (MB) | Δ RSS (MB) | Python peak (MB) | freed |")
    print("|---|---|---|---|---|---|---|---|")
    prev = rss_start
    for r in rows:
        peak = "-" if r["py_peak"] is None else f"{r['py_peak'] / MB:.0f}"
        print(
            f"| {r['run']} | {r['compile_s']:.0f} ({r['compile_cpu_s']:.0f}) | {r['eval_s']:.1f} | {r['ppl']:.6f} | "
            f"{r['rss'] / MB:.0f} | "
            f"{(r['rss'] - prev) / MB:+.0f} | {peak} | {'yes' if r['freed'] else 'NO'} |"
        )
        prev = r["rss"]

    failures = []
    ppls = {r["ppl"] for r in rows}
    if len(ppls) != 1:
        failures.append(f"perplexities differ between runs: {sorted(ppls)}")
    if not all(r["freed"] for r in rows):
        alive = [r["run"] for r in rows if not r["freed"]]
        failures.append(f"compiled models still alive after del + gc: runs {alive}")
    a, b = rows[-2]["rss"], rows[-1]["rss"]
    allowed = max(args.growth_pct / 100 * a, args.growth_mb * MB)
    if b - a > allowed:
        failures.append(
            f"RSS grew by {(b - a) / MB:.0f} MB between runs {rows[-2]['run']} and {rows[-1]['run']} "
            f"(allowed {allowed / MB:.0f} MB)"
        )
    print()
    if failures:
        for f in failures:
            print("FAIL:", f)
        return 1
    print(
        f"OK: identical perplexity in {len(rows)} runs, every compiled model freed, RSS growth between the last two "
        f"runs {(b - a) / MB:+.0f} MB (allowed {allowed / MB:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
