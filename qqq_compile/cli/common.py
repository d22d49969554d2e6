"""What the ``qqq-compile`` commands share: progress lines, argument checks, loading an
artifact with its tokenizer, the compile config built from the common options, and small
output helpers. Used by :mod:`.cli` (the parser and most commands), :mod:`.cli_demo` and
(handed down by the parser) :mod:`.cli_generate`; it imports none of them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PRESET_CHOICES = ("qqq_rot", "qqq", "rtn", "gptq", "smoothquant")


class CLIError(ValueError):
    """A problem with the command line the user can fix (message says how)."""


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


def return_freed_memory() -> bool:
    """Make glibc's malloc give freed tensor memory back to the system; True if it did.

    glibc serves allocations above a threshold with mmap and returns them on free, but each
    such free raises the threshold to the freed size (up to 32 MB), so later tensors of a few
    MB come from the heap and stay resident after they are freed. Quantizing frees thousands
    of those (activations, Hessians, rewritten weights): with the threshold fixed at 1 MB,
    `qqq-compile quantize demo`'s first blocks peaked 0.5 GB lower (3.3 -> 2.8 GB) and ended
    0.9 GB lower. Its price, a page fault per 4 KB of every large tensor made again (4.1 M
    faults and 7.7 s of system time per SmolLM2 GPTQ block), is gone inside the calibration
    loop: there the C++ extension's allocator hands freed tensors of 256 KB and more back
    whole (``targets.w4a8.kernels.cpu.AllocationReuse``; docs/RESULTS.md, round 8). A process-wide
    setting, so only the CLI (which owns its process) sets it; a user's
    ``MALLOC_MMAP_THRESHOLD_`` wins, and other C libraries are left alone.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 20)) and bool(mallopt(m_trim_threshold, 16 << 20))


def check_preset(name: str) -> None:
    import qqq_compile  # noqa: F401 - registers the presets
    from qqq_compile.compiler.pipeline import PRESETS

    if name not in PRESETS.names():
        raise CLIError(
            f"preset '{name}' is not available in this installation (available: {', '.join(PRESETS.names())}); "
            "pick one of those with --preset"
        )


def positive(name: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{name} must be at least 1, got {value}")


def load_artifact(path: str, tokenizer_source: str | None = None, need_tokenizer: bool = False) -> tuple[Any, Any]:
    """(compiled model, tokenizer) of an artifact; the tokenizer is checked first (loading is slower)."""
    from qqq_compile.artifact import load, load_tokenizer

    if tokenizer_source:
        from transformers import AutoTokenizer

        src = Path(tokenizer_source).expanduser()
        if tokenizer_source == "demo":
            from qqq_compile.models import demo_model_path

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


def float_bytes(model: Any) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def compile_config(args: argparse.Namespace, preset: str | None = None) -> Any:
    from qqq_compile.config import CalibConfig, CompileConfig, QuantConfig

    quant = QuantConfig(
        target=getattr(args, "target", "w4a8"),
        group_size=args.group_size,
        float_weight_dtype=args.float_weight_dtype,
        int8_head=args.int8_head,
    )
    return CompileConfig(preset=preset or args.preset, quant=quant, calib=CalibConfig(batch_size=args.batch_size))


def add_target(p: argparse.ArgumentParser) -> None:
    """``--target`` (the registered targets) and ``--group-size`` (the target's default)."""
    from qqq_compile.targets import builtin  # noqa: F401 - registers the shipped targets
    from qqq_compile.targets.registry import targets

    known = targets()
    p.add_argument(
        "--target",
        choices=[t.name for t in known],
        default="w4a8",
        help="weight format and runtime: " + "; ".join(f"{t.name}: {t.summary}" for t in known) + " (default: w4a8)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help="-1: per output channel, or e.g. 128 (default: the target's: "
        + ", ".join(f"{t.name} {t.default_group_size}" for t in known)
        + ")",
    )


def export_formats() -> dict[str, str]:
    """Every format some registered target can be exported to: name -> description."""
    from qqq_compile.targets import builtin  # noqa: F401 - registers the shipped targets
    from qqq_compile.targets.registry import targets

    return {k: v for t in targets() for k, v in t.export_formats.items()}


def add_float_weight_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--int8-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lm_head and embedding as int8 W8A8 (default: on; --no-int8-head keeps them in float): "
        "~4x fewer bytes per decoded token for the head, +0.5%% perplexity on SmolLM2",
    )
    p.add_argument(
        "--float-weight-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="store the weights left unquantized (lm_head, embeddings) in this dtype (default: the model's)",
    )
