"""Pass infrastructure: ``QQQPass``, ``PassConfig``, ``PassResult``, ``Pipeline``, instruments,
registries and the ``Report`` a pipeline leaves.

A pass is data plus a handler: its options are a :class:`PassConfig` dataclass that
round-trips to a dict (unknown keys rejected), and its ``call(graph_module, ctx)`` returns
``PassResult(graph_module, modified)``. Passes see only the GraphModule and a
:class:`CompileContext`; they never see the original ``nn.Module``. Each pass class
declares what it ``requires`` (calibration data, passes that must run before it) and its
``replay_mode``: how ``load()`` rebuilds what it did (run it again, replay a recorded
state, or nothing: its effect is restored from the saved tensors).

The :class:`Pipeline` lints and recompiles the graph after every pass, and runs the
instruments (print-after-pass, dump graphs with diffs, timing); passes do neither.
Pipelines are assembled by :mod:`qqq_compile.compiler.driver`, the one place that turns a config
into a pass list.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch.fx import GraphModule

from qqq_compile.compiler.report import Note, PassRecord, Report, first_tensor, sqnr_db  # noqa: F401 - re-exported
from qqq_compile.config import CalibConfig, ConfigBase, ConfigError, QuantConfig
from qqq_compile.errors import PipelineError
from qqq_compile.targets.registry import Target, get_target

P = TypeVar("P", bound="QQQPass")


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool


@dataclass
class CompileContext:
    """Everything a pass may use besides the graph.

    * ``calib``: calibration batches, each a dict of keyword inputs for the graph
      (``{"input_ids": LongTensor[B, T]}``).
    * ``quant``: the deployed format every pass agrees on, resolved by its target
      (``group_size`` filled in and checked); ``target``: that
      :class:`~qqq_compile.targets.registry.Target`, which passes ask for grids,
      quantizers and the lowering.
    * ``device``: where passes compute (calibration batches, Hessians, searches); the
      graph's weights are expected there too.
    * ``progress``: show tqdm bars.
    * ``notes``: passes append :class:`Note` s here; they end up in the report.

    Build one with :func:`qqq_compile.compiler.driver.build_context` (every entry path
    does); constructing it directly is fine in tests and tools.
    """

    calib: list[dict[str, torch.Tensor]] = field(default_factory=list)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib_config: CalibConfig = field(default_factory=CalibConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    notes: list[Note] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.quant = get_target(self.quant.target).resolve(self.quant)

    @property
    def target(self) -> Target:
        return get_target(self.quant.target)

    def note(self, pass_name: str, message: str, target: str | None = None, level: str = "info") -> None:
        self.notes.append(Note(pass_name, message, target, level))

    def require_calib(self, pass_name: str) -> list[dict[str, torch.Tensor]]:
        if not self.calib:
            raise ValueError(
                f"pass '{pass_name}' needs calibration data, but none was given: "
                "pass calib=... to qqq_compile.compile (token-id tensors or a text source)"
            )
        return self.calib


@dataclass(frozen=True)
class PassConfig(ConfigBase):
    """Options of a pass (this base: none). Subclasses are frozen dataclasses whose fields
    are the pass constructor's keyword arguments; invalid values raise :class:`ConfigError`."""


#: How ``load()`` rebuilds what a pass did (``QQQPass.replay_mode``):
#: ``"rerun"``: ``call()`` again, with no calibration data (deterministic given the graph,
#: its annotations and the pass config); ``"state"``: ``replay(gm, ctx, state)`` with what
#: the pass recorded (:func:`qqq_compile.annotations.set_replay_state`); ``"tensors"``:
#: nothing to rebuild, the pass only annotated or changed tensor values, which the
#: artifact stores.
REPLAY_MODES = ("rerun", "state", "tensors")


class QQQPass:
    """Base class for passes. Subclasses set ``name``, ``config_class``, ``requires`` and
    ``replay_mode``, and implement :meth:`call`.

    Options live in ``self.config`` (a :class:`PassConfig`); they also read (and write,
    re-validated) as attributes: ``p.damp`` is ``p.config.damp``. A pass rebuilt from its
    config (:meth:`from_config`) equals the original, so a pipeline can be stored as JSON
    (:meth:`to_dict`) and rebuilt exactly (:func:`pass_from_dict`). The constructor's
    keyword arguments are the config's fields.
    The docstring of each pass states its preconditions and where it sits in the order.
    """

    name: str = "unnamed"
    config_class: ClassVar[type[PassConfig]] = PassConfig
    #: ``"calib"`` (calibration data) and/or names of passes that must run earlier.
    requires: ClassVar[tuple[str, ...]] = ()
    #: One of :data:`REPLAY_MODES`; None: ``"state"`` when the class has ``replay()``,
    #: else ``"tensors"``.
    replay_mode: ClassVar[str | None] = None
    #: The pass works on the whole model's graph (its lm_head or token embedding), so the
    #: blockwise fallback, which compiles decoder blocks alone, leaves it out.
    whole_model: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None):
        cls = type(self)
        if config is None:
            config = cls.config_class()
        if not isinstance(config, cls.config_class):
            raise ConfigError(f"{cls.__name__} takes a {cls.config_class.__name__}, got {type(config).__name__}")
        object.__setattr__(self, "config", config)

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph_module: GraphModule, ctx: CompileContext | None = None) -> PassResult:
        """Run the pass alone: like one step of a :class:`Pipeline` (lint, recompile)."""
        result = self.call(graph_module, ctx if ctx is not None else CompileContext())
        finish_graph(result)
        return result

    # -- options as data

    @property
    def options(self) -> dict[str, Any] | None:
        """The config as a plain dict (None for a pass without a config: a user pass that
        never called ``QQQPass.__init__``)."""
        cfg = self.__dict__.get("config")
        return cfg.to_dict() if cfg is not None else None

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``: what a manifest stores to rebuild this pass."""
        return {"name": self.name, "options": self.options}

    @classmethod
    def from_config(cls: type[P], config: PassConfig | dict[str, Any] | None) -> P:
        """The pass with these options (a config object or its dict)."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        if config is None:
            return cls()
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def effective_replay_mode(self) -> str:
        mode = self.replay_mode or ("state" if callable(getattr(self, "replay", None)) else "tensors")
        if mode not in REPLAY_MODES:
            raise ConfigError(f"pass '{self.name}' declares replay_mode={mode!r}; use one of {REPLAY_MODES}")
        return mode

    def __getattr__(self, key: str) -> Any:
        # Only reached when normal lookup fails: options read as attributes.
        cfg = self.__dict__.get("config")
        if cfg is not None and key in _field_names(cfg):
            return getattr(cfg, key)
        raise AttributeError(f"{type(self).__name__!s} object has no attribute {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        cfg = self.__dict__.get("config")
        if cfg is not None and key in _field_names(cfg):  # re-validated, and the manifest stays true
            object.__setattr__(self, "config", dataclasses.replace(cfg, **{key: value}))
        else:
            object.__setattr__(self, key, value)

    def __eq__(self, other: object) -> bool:
        # Passes are data: equal when of one class with the same state (options, and e.g. the
        # function a FunctionPass wraps).
        if type(other) is not type(self):
            return NotImplemented
        return self.name == other.name and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        try:
            return hash((type(self), self.name, self.__dict__.get("config")))
        except TypeError:  # a user config with unhashable fields
            return id(self)

    def __repr__(self) -> str:
        opts = self.options
        if not opts:
            return f"{type(self).__name__}(name={self.name!r})"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


def _field_names(cfg: PassConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}


def finish_graph(result: PassResult) -> None:
    """What the pipeline does after every pass: lint the graph, regenerate its code if
    the pass changed it."""
    if not isinstance(result, PassResult):
        raise TypeError(f"call() returned {type(result).__name__}, expected PassResult")
    result.graph_module.graph.lint()
    if result.modified:
        result.graph_module.recompile()


class FunctionPass(QQQPass):
    """Wraps ``fn(gm, ctx) -> PassResult | bool`` as a pass (for quick user passes)."""

    def __init__(self, fn: Callable[[GraphModule, CompileContext], Any], name: str | None = None):
        super().__init__()
        self.fn = fn
        self.name = name or fn.__name__

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": None}  # a function is not data: load() cannot rebuild it

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

    def __contains__(self, name: str) -> bool:
        return name in self._items


PASSES = Registry("pass")
PRESETS = Registry("preset")


def register_pass(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make a pass constructible by name (``PASSES.get(name)(**kw)``)."""
    return PASSES.register(name)


def register_preset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return PRESETS.register(name)


def pass_from_dict(spec: dict[str, Any]) -> QQQPass:
    """Rebuild a registered pass from ``QQQPass.to_dict()`` output. Raises ``KeyError``
    for an unregistered name and :class:`ConfigError` for options its config rejects."""
    if not isinstance(spec, dict) or set(spec) - {"name", "options"} or "name" not in spec:
        raise ConfigError(f"a pass spec is {{'name': ..., 'options': {{...}}}}, got {spec!r}")
    cls = PASSES.get(spec["name"])
    if not (isinstance(cls, type) and issubclass(cls, QQQPass)):
        return cls(**(spec.get("options") or {}))  # a registered factory function
    return cls.from_config(spec.get("options"))


# ----------------------------------------------------------------------------- instruments


class Instrument:
    """Hooks the pipeline calls around each pass. Override what you need."""

    def before_pipeline(self, gm: GraphModule) -> None: ...

    def before_pass(self, index: int, pass_: QQQPass, gm: GraphModule) -> None: ...

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


@dataclass
class NumericCheck:
    """After each modifying pass, run ``inputs`` and compare with the previous step.

    A pass whose output SQNR against the step before falls below ``min_sqnr_db`` fails
    the pipeline (``None``: record only).
    """

    inputs: dict[str, torch.Tensor]
    min_sqnr_db: float | None = None


class Pipeline:
    """Runs passes in order, lints (and recompiles) after each, optionally checks numerics, calls
    instruments. Build one through :func:`qqq_compile.compiler.driver.run_pipeline` unless you hold
    the pass list yourself."""

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
            for ins in self.instruments:
                ins.before_pass(i, p, gm)
            t0 = time.perf_counter()
            try:
                result = p.call(gm, ctx)
                finish_graph(result)
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
