"""Quantization speed: the default preset on SmolLM2-135M, per pass, per block, per token.

    python benchmarks/quant_speed.py                        # 128 windows, default preset, streaming
    python benchmarks/quant_speed.py --no-streaming         # the same on the model loaded whole
    python benchmarks/quant_speed.py --per-block --variants new --blocks 3 --rounds 1 --allocator glibc
                                    # (then --allocator cli, in turn: what the CLI's malloc setting costs)
    python benchmarks/quant_speed.py --n-calib 32 --eval    # fewer windows; + eval perplexity
    python benchmarks/quant_speed.py --n-calib 32 --folder DIR/model   # another checkpoint (random tokens)
    python benchmarks/quant_speed.py --per-block --blocks 2 --rounds 3
                                    # old (git revision) vs new GPTQ, round-robin per block
    python benchmarks/quant_speed.py --per-block --variants new-noreuse,new --blocks 2 --rounds 3
                                    # what the reusing allocator saves, under the CLI's malloc setting

Full mode: the default preset (``qqq_rot``) as ``qqq-compile quantize demo`` runs it
(``compile_from_disk``: weights on disk, one block in memory; ``--no-streaming``:
``qqq_compile.compile`` on the loaded model) on ``--n-calib`` windows of 512 tokens
(the standard protocol: ``data.standard_splits``), then a table of wall seconds per pass
(the report's pass records), capture, total, peak RSS of the process (before ``--eval``)
and the rate in seconds per billion parameters per calibration token (the quantized
linears' parameters; ``s / (B params · token)``: multiply by a model's size and the
calibration tokens to extrapolate). ``--eval`` adds the perplexity on the standard 40
evaluation windows (BOS + 511; the model comes from a Q4_1 GGUF, so its weights already
sit on a 4-bit grid and every quantization error is understated).

Per-block mode: the graph is captured and rotated once; then the GPTQ pass of each
variant runs over the first ``--blocks`` decoder blocks of a fresh copy, variants taking
turns (round-robin, so load drift hits all alike), and the median seconds per block and
the ratio against the first variant are printed. Variants: ``old`` (the GPTQ pass and solve
of ``--baseline-rev``, loaded from git), ``new`` (this checkout's defaults), ``new-fp32``
(fp32 Hessians and GPTAQ float run), ``new-noreuse`` (calibration without the reusing
allocator, ``cpu.CALIB_REUSE_BYTES = 0``); ``NAME@B`` runs a variant on calibration batches of
``B`` windows (default: ``CalibConfig.batch_size``). The ratios are the figures to quote on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "41e9231"  # the restructure commit before the batch-major GPTQ (issue 18)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _faults() -> int:
    # page faults are where a malloc setting's cost shows (each mapped tensor is faulted in afresh)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


# ----------------------------------------------------------------------------- full run


def set_allocator(kind: str, reuse_mb: int | None = None) -> bool:
    """``"cli"``: the CLI's glibc setting (``cli.common.return_freed_memory``: freed tensors go
    back to the system), so time and peak are the CLI's; ``"glibc"``: glibc's defaults.
    ``reuse_mb``: the calibration's cache of freed tensors (``cpu.CALIB_REUSE_BYTES``; 0: off)."""
    from qqq_compile.cli.common import return_freed_memory
    from qqq_compile.targets.w4a8.kernels import cpu as kernels_cpu  # the block runner reads its CALIB_REUSE_BYTES

    if reuse_mb is not None:
        kernels_cpu.CALIB_REUSE_BYTES = reuse_mb << 20

    return return_freed_memory() if kind == "cli" else False


def full_run(args: argparse.Namespace) -> dict:
    import qqq_compile as qc
    from qqq_compile.data import standard_splits
    from qqq_compile.models import demo_model_path, load_model

    out_allocator = set_allocator(args.allocator, args.reuse_mb)
    if args.folder:  # another checkpoint (random weights, no tokenizer): seeded random tokens
        if not args.streaming or args.eval:
            raise SystemExit("--folder streams its checkpoint and has no text to evaluate: drop --no-streaming/--eval")
        folder = args.folder
        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(0)
        calib, evals = [torch.randint(0, vocab, (1, 512), generator=g) for _ in range(args.n_calib)], []
    elif args.streaming:  # as `qqq-compile quantize demo` runs: the weights stay on disk
        from transformers import AutoTokenizer

        folder = demo_model_path()
        calib, evals = standard_splits(AutoTokenizer.from_pretrained(folder), n_calib=args.n_calib)
    else:
        model, tok = load_model("demo")
        calib, evals = standard_splits(tok, n_calib=args.n_calib)
    config = {"preset": args.preset, "quant": {"group_size": args.group_size}}
    # The C++ kernels before the clock: a machine's first run builds them (a minute, once;
    # cached after), which would otherwise land in the first pass that calls a kernel.
    from qqq_compile.targets.w4a8.kernels.cpu import ensure_cpp_kernels

    tk = time.perf_counter()
    ensure_cpp_kernels()
    kernels_s = time.perf_counter() - tk
    t0 = time.perf_counter()
    if args.streaming:
        from qqq_compile.compiler.api import compile_from_disk

        compiled = compile_from_disk(folder, calib, config, dtype=torch.float32, progress=not args.quiet)
    else:
        compiled = qc.compile(model, calib, config, progress=not args.quiet)
    total = time.perf_counter() - t0
    passes = [(p.name, p.seconds) for p in compiled.report.passes]
    tokens = sum(w.numel() for w in calib)
    params = sum(li.in_features * li.out_features for li in compiled.linears() if ".layers." in li.fqn)
    out = {
        "model": args.folder or "SmolLM2-135M",
        "preset": args.preset,
        "streaming": args.streaming,
        "cli_allocator": out_allocator,
        "group_size": args.group_size,
        "n_calib": len(calib),
        "calib_tokens": tokens,
        "threads": torch.get_num_threads(),
        "passes": passes,
        "total_s": total,
        "kernels_load_s": kernels_s,
        "capture_and_rest_s": total - sum(s for _, s in passes),
        "block_linear_params": params,
        "s_per_bparam_token": total / (params / 1e9 * tokens),
        "peak_rss": _peak_rss(),
    }
    if args.eval:
        from qqq_compile.eval import perplexity

        out["eval_ppl"] = perplexity(compiled, evals, progress=not args.quiet)
        out["n_eval"] = len(evals)
    return out


def print_full(r: dict) -> None:
    how = "streaming from disk, as `qqq-compile quantize demo`" if r["streaming"] else "model loaded whole"
    print(f"\npreset {r['preset']} (group size {r['group_size']}), {r['n_calib']} windows, {r['calib_tokens']} tokens,")
    print(how + (", the CLI's allocator setting," if r.get("cli_allocator") else ","))
    model = r.get("model", "SmolLM2-135M")
    print(f"{r['threads']} threads, {model} ({r['block_linear_params'] / 1e6:.1f} M params in block linears)\n")
    print("| step | wall s |\n|---|---|")
    for name, s in r["passes"]:
        print(f"| {name} | {s:.1f} |")
    print(f"| capture, calibration batching, wrapping | {r['capture_and_rest_s']:.1f} |")
    print(f"| **total** | **{r['total_s']:.1f}** |")
    kernels = f"the C++ kernels loaded in {r['kernels_load_s']:.1f} s"
    print(f"\n(before the clock: {kernels}; a machine's first build takes about a minute, once)")
    print(f"\npeak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_rss'] / 1e9:.2f} GB (model loading included)")
    print(f"rate: {r['s_per_bparam_token']:.3g} s / (B params x calibration token)")
    if "eval_ppl" in r:
        n = r["n_eval"]
        print(f"eval perplexity {r['eval_ppl']:.3f} ({n} standard windows of BOS + 511 tokens; GGUF Q4_1 weights)")


# ----------------------------------------------------------------------------- per block


def load_baseline(rev: str) -> type:
    """The GPTQ pass class of git revision ``rev`` (its gptq.py and gptq_solve.py), loaded
    under other module names and not registered, so it runs beside this checkout's."""
    mods = {}
    for name, path in (
        ("qqq_baseline_gptq_solve", "qqq_compile/compiler/gptq_solve.py"),
        ("qqq_baseline_gptq", "qqq_compile/compiler/passes/gptq.py"),
    ):
        src = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        src = src.replace("from qqq_compile.compiler.gptq_solve import", "from qqq_baseline_gptq_solve import")
        src = src.replace('@register_pass("gptq")\n', "")
        mod = types.ModuleType(name)
        mod.__file__ = f"<{rev}:{path}>"
        sys.modules[name] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own source at a revision
        mods[name] = mod
    cls = mods["qqq_baseline_gptq"].GPTQ
    cls.name = "gptq"
    return cls


def per_block(args: argparse.Namespace) -> dict:
    set_allocator(args.allocator, args.reuse_mb)
    import qqq_compile.compiler.block_runner as br
    from qqq_compile.compiler.calibration import calib_batches, example_call
    from qqq_compile.compiler.capture import capture
    from qqq_compile.compiler.driver import build_passes, run_pipeline
    from qqq_compile.compiler.passes.gptq import GPTQ
    from qqq_compile.compiler.pipeline import CompileContext
    from qqq_compile.config import CompileConfig
    from qqq_compile.data import standard_splits
    from qqq_compile.models import load_model
    from qqq_compile.targets.w4a8.kernels.cpu import ensure_cpp_kernels

    model, tok = load_model("demo")
    calib, _ = standard_splits(tok, n_calib=args.n_calib)
    config = CompileConfig.from_dict({"preset": args.preset, "quant": {"group_size": args.group_size}})
    batches = calib_batches(calib, None, config.calib.batch_size, None, model=model)
    captured = capture(model, example_call(batches))
    del model
    gm = captured.graph_module
    ctx = CompileContext(calib=[captured.graph_inputs(b) for b in batches], quant=config.quant, progress=False)
    passes = build_passes(config)
    i = [p.name for p in passes].index("gptq")
    gm, _ = run_pipeline(gm, ctx, passes[:i], config=config)
    options = passes[i].config.to_dict()
    from qqq_compile.targets.w4a8.kernels import cpu as kernels_cpu  # the block runner reads its CALIB_REUSE_BYTES

    variants, calibs, no_reuse = {}, {}, set()
    reuse = kernels_cpu.CALIB_REUSE_BYTES
    for spec in args.variants.split(","):
        v, _, bs = spec.partition("@")  # NAME@B: calibration batches of B windows
        if bs:
            b = calib_batches(calib, None, int(bs), None)
            calibs[spec] = [captured.graph_inputs(x) for x in b]
        if v == "old":
            old = load_baseline(args.baseline_rev)
            keep = {k: o for k, o in options.items() if k in old.config_class.__dataclass_fields__}
            variants[spec] = old(**keep)
        elif v == "new":
            variants[spec] = GPTQ(**options)
        elif v == "new-noreuse":  # calibration without the reusing allocator (CALIB_REUSE_BYTES = 0)
            variants[spec] = GPTQ(**options)
            no_reuse.add(spec)
        elif v == "new-fp32":
            variants[spec] = GPTQ(**{**options, "hessian_dtype": "float32", "asym_dtype": "float32"})
        else:
            raise SystemExit(f"unknown variant {v!r}: use old, new, new-noreuse, new-fp32")
    ensure_cpp_kernels()  # loading the extension is not GPTQ's time
    real = br.partition

    def first_blocks(g):
        part = real(g)
        part.blocks[:] = part.blocks[: args.blocks]
        return part

    br.partition = first_blocks
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds):
            for name, p in variants.items():
                g = copy.deepcopy(gm)
                kernels_cpu.CALIB_REUSE_BYTES = 0 if name in no_reuse else reuse
                t, c, f = time.perf_counter(), time.process_time(), _faults()
                p.call(g, CompileContext(calib=calibs.get(name, ctx.calib), quant=ctx.quant, progress=False))
                times[name].append((time.perf_counter() - t) / args.blocks)
                cpu[name].append((time.process_time() - c) / args.blocks)
                faults[name].append((_faults() - f) / args.blocks)
                del g
                print(
                    f"round {r + 1}: {name} {times[name][-1]:.2f} s/block ({cpu[name][-1]:.2f} CPU s, "
                    f"{faults[name][-1] / 1e6:.2f} M page faults)",
                    flush=True,
                )
    finally:
        br.partition = real
    base = next(iter(variants))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    return {
        "n_calib": args.n_calib,
        "blocks": args.blocks,
        "rounds": args.rounds,
        "median_s_per_block": med,
        "median_cpu_s_per_block": med_cpu,
        "ratio_vs_" + base: {v: med[base] / m for v, m in med.items()},
        "cpu_ratio_vs_" + base: {v: med_cpu[base] / m for v, m in med_cpu.items()},
        "wall": times,
        "cpu": cpu,
        "page_faults_per_block": faults,
        "peak_rss": _peak_rss(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-calib", type=int, default=128, help="calibration windows of 512 tokens (default 128)")
    ap.add_argument("--preset", default="qqq_rot")
    ap.add_argument("--group-size", type=int, default=None, help="default: the target's (w4a8: 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full mode: stream the weights from the demo's folder, as the CLI does (default); "
        "--no-streaming: qqq_compile.compile on the loaded model",
    )
    ap.add_argument(
        "--allocator",
        choices=("cli", "glibc"),
        default="cli",
        help="cli: the CLI's malloc setting (mmap threshold 1 MB; default); glibc: glibc's defaults",
    )
    ap.add_argument(
        "--reuse-mb",
        type=int,
        default=None,
        help="MB of freed tensors calibration keeps for reuse (default: cpu.CALIB_REUSE_BYTES; 0: off)",
    )
    ap.add_argument("--eval", action="store_true", help="also the perplexity on the 40 standard eval windows")
    ap.add_argument(
        "--folder",
        default=None,
        help="full mode: quantize this checkpoint folder instead (streaming; seeded random-token windows), e.g. "
        "a random model of Qwen2.5-0.5B's shape: benchmarks/memory.py --layers 24 --hidden 896 "
        "--intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936 --keep --workdir DIR",
    )
    ap.add_argument("--per-block", action="store_true", help="time GPTQ per block: variants round-robin")
    ap.add_argument("--blocks", type=int, default=2, help="per-block mode: decoder blocks per timing")
    ap.add_argument("--rounds", type=int, default=3, help="per-block mode: rounds of every variant")
    ap.add_argument("--variants", default="old,new", help="per-block mode: old,new,new-fp32 (first = baseline)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the 'old' variant")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.per_block:
        r = per_block(args)
        print(f"\nGPTQ per decoder block, {args.n_calib} windows, median of {args.rounds} rounds:")
        base = next(iter(r["median_s_per_block"]))
        for v, m in r["median_s_per_block"].items():
            c = r["median_cpu_s_per_block"][v]
            print(
                f"  {v:10s} {m:7.2f} s/block  ({r['ratio_vs_' + base][v]:.2f}x vs {base}); "
                f"CPU {c:7.2f} s/block ({r['cpu_ratio_vs_' + base][v]:.2f}x)"
            )
        print(f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    else:
        r = full_run(args)
        print_full(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
