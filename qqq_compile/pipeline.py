"""Pass infrastructure: ``QQQPass``, ``PassResult``, ``Pipeline``, instruments, registry.

A pass is an object whose ``call(graph_module, ctx)`` returns
``PassResult(graph_module, modified)``. Passes see only the GraphModule and a
:class:`CompileContext`; they never see the original ``nn.Module``.

Instruments (print-after-pass, dump graphs with diffs, timing) belong to the
:class:`Pipeline`, never to individual passes.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .config import CalibConfig, QuantConfig


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool


@dataclass
class Note:
    """Something a pass wants the user to know (a skipped fold, a damping retry...)."""

    pass_name: str
    message: str
    target: str | None = None
    level: str = "info"


@dataclass
class CompileContext:
    """Everything a pass may use besides the graph.

    * ``calib``: calibration batches, each a dict of keyword inputs for the graph
      (``{"input_ids": LongTensor[B, T]}``).
    * ``quant``: the W4A8 format every pass agrees on.
    * ``progress``: show tqdm bars.
    * ``notes``: passes append :class:`Note` s here; they end up in the report.
    """

    calib: list[dict[str, torch.Tensor]] = field(default_factory=list)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib_config: CalibConfig = field(default_factory=CalibConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    notes: list[Note] = field(default_factory=list)
    seed: int = 0

    def note(self, pass_name: str, message: str, target: str | None = None, level: str = "info") -> None:
        self.notes.append(Note(pass_name, message, target, level))

    def require_calib(self, pass_name: str) -> list[dict[str, torch.Tensor]]:
        if not self.calib:
            raise ValueError(
                f"pass '{pass_name}' needs calibration data, but none was given: "
                "pass calib=... to qqq_compile.compile (token-id tensors or a text source)"
            )
        return self.calib


class QQQPass:
    """Base class for passes. Subclasses set ``name`` and implement :meth:`call`.

    The docstring of each pass states its preconditions and where it sits in the order.
    """

    name: str = "unnamed"

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph_module: GraphModule, ctx: CompileContext | None = None) -> PassResult:
        return self.call(graph_module, ctx if ctx is not None else CompileContext())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionPass(QQQPass):
    """Wraps ``fn(gm, ctx) -> PassResult | bool`` as a pass (for quick user passes)."""

    def __init__(self, fn: Callable[[GraphModule, CompileContext], Any], name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        out = self.fn(graph_module, ctx)
        if isinstance(out, PassResult):
            return out
        if isinstance(out, bool):
            return PassResult(graph_module, out)
        raise TypeError(f"pass function {self.name} must return PassResult or bool, got {type(out).__name__}")


# ----------------------------------------------------------------------------- registry


class Registry:
    """Name → factory table for passes and presets."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered to {self._items[name]}")
            self._items[name] = obj
            if isinstance(obj, type) and issubclass(obj, QQQPass) and obj.name == "unnamed":
                obj.name = name
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


PASSES = Registry("pass")
PRESETS = Registry("preset")


def register_pass(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make a pass constructible by name (``PASSES.get(name)(**kw)``)."""
    return PASSES.register(name)


def register_preset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return PRESETS.register(name)


# ----------------------------------------------------------------------------- instruments


class Instrument:
    """Hooks the pipeline calls around each pass. Override what you need."""

    def before_pipeline(self, gm: GraphModule) -> None: ...

    def after_pass(self, index: int, pass_: QQQPass, result: PassResult, seconds: float) -> None: ...

    def after_pipeline(self, gm: GraphModule) -> None: ...


class PrintAfterPass(Instrument):
    """Print the readable graph after every pass (or only the named ones)."""

    def __init__(self, only: Iterable[str] | None = None, printer: Callable[[str], None] = print):
        self.only = set(only) if only else None
        self.printer = printer

    def after_pass(self, index: int, pass_: QQQPass, result: PassResult, seconds: float) -> None:
        if self.only is None or pass_.name in self.only:
            self.printer(f"# after pass {index} '{pass_.name}' (modified={result.modified})")
            self.printer(readable_graph(result.graph_module))


class DumpGraphs(Instrument):
    """Write ``NN_<pass>.txt`` (readable graph) and ``NN_<pass>.diff`` (vs the step before)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._prev: str | None = None

    def before_pipeline(self, gm: GraphModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prev = readable_graph(gm)
        (self.folder / "00_input.txt").write_text(self._prev)

    def after_pass(self, index: int, pass_: QQQPass, result: PassResult, seconds: float) -> None:
        text = readable_graph(result.graph_module)
        stem = f"{index + 1:02d}_{pass_.name}"
        (self.folder / f"{stem}.txt").write_text(text)
        diff = difflib.unified_diff(
            (self._prev or "").splitlines(True), text.splitlines(True), "before", f"after {pass_.name}"
        )
        (self.folder / f"{stem}.diff").write_text("".join(diff))
        self._prev = text


class TimePasses(Instrument):
    """Record wall time per pass in ``self.times`` (also in the pipeline's records)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def after_pass(self, index: int, pass_: QQQPass, result: PassResult, seconds: float) -> None:
        self.times.append((pass_.name, seconds))

    def table(self) -> str:
        rows = [f"| {n} | {s:.2f} |" for n, s in self.times]
        return "\n".join(["| pass | seconds |", "|---|---|", *rows])


def readable_graph(gm: GraphModule) -> str:
    """The graph as Python-like text with ``torch.ops.qqq.*`` visible."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


# ----------------------------------------------------------------------------- pipeline


class PipelineError(RuntimeError):
    """A pass failed (or broke the graph); names the pass and those that ran before it."""

    def __init__(self, pass_name: str, index: int, before: Sequence[str], cause: BaseException | str):
        self.pass_name, self.index, self.before = pass_name, index, list(before)
        ran = ", ".join(self.before) if self.before else "none"
        super().__init__(f"pass #{index} '{pass_name}' failed (passes run before it: {ran}): {cause}")


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    sqnr_db: float | None = None


@dataclass
class NumericCheck:
    """After each modifying pass, run ``inputs`` and compare with the previous step.

    A pass whose output SQNR against the step before falls below ``min_sqnr_db`` fails
    the pipeline (``None``: record only).
    """

    inputs: dict[str, torch.Tensor]
    min_sqnr_db: float | None = None


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for identical tensors)."""
    ref, test = ref.detach().double(), test.detach().double()
    noise = (ref - test).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(ref.pow(2).sum().item(), 1e-30) / noise)


def first_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a graph call (``.logits`` for HF outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


class Pipeline:
    """Runs passes in order, lints after each, optionally checks numerics, calls instruments."""

    def __init__(
        self,
        passes: Sequence[QQQPass],
        instruments: Sequence[Instrument] = (),
        numeric_check: NumericCheck | None = None,
    ):
        for p in passes:
            if not isinstance(p, QQQPass):
                raise TypeError(
                    f"pipeline entries must be QQQPass objects, got {p!r}; wrap functions with FunctionPass"
                )
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.numeric_check = numeric_check
        self.records: list[PassRecord] = []

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        self.records = []
        for ins in self.instruments:
            ins.before_pipeline(gm)
        ref = self._reference(gm)
        any_modified = False
        for i, p in enumerate(self.passes):
            before = [q.name for q in self.passes[:i]]
            t0 = time.perf_counter()
            try:
                result = p.call(gm, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"call() returned {type(result).__name__}, expected PassResult")
                result.graph_module.graph.lint()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                raise PipelineError(p.name, i, before, e) from e
            seconds = time.perf_counter() - t0
            gm = result.graph_module
            any_modified |= result.modified
            rec = PassRecord(p.name, result.modified, seconds)
            if ref is not None and result.modified:
                out = self._reference(gm)
                rec.sqnr_db = sqnr_db(ref, out)
                floor = self.numeric_check.min_sqnr_db  # type: ignore[union-attr]
                if floor is not None and rec.sqnr_db < floor:
                    raise PipelineError(
                        p.name, i, before, f"output SQNR {rec.sqnr_db:.1f} dB fell below the floor {floor} dB"
                    )
                ref = out
            self.records.append(rec)
            for ins in self.instruments:
                ins.after_pass(i, p, result, seconds)
        for ins in self.instruments:
            ins.after_pipeline(gm)
        return PassResult(gm, any_modified)

    def _reference(self, gm: GraphModule) -> torch.Tensor | None:
        if self.numeric_check is None:
            return None
        with torch.no_grad():
            return first_tensor(gm(**self.numeric_check.inputs)).float()

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(p.name for p in self.passes) + "])"
