"""Targets: a weight format plus where it runs, registered by name like passes and presets.

A :class:`Target` owns everything that depends on the deployed format, so that the passes,
the driver, the runtime and the artifact code ask it instead of naming a format:

* **the format**: :meth:`Target.resolve` fills and checks the format options of a
  :class:`~qqq_compile.config.QuantConfig` (group size...); :meth:`Target.grid` gives the
  values a weight can take (the :class:`Grid` that GPTQ and the clip search optimise on);
  :meth:`Target.quantize_rtn`, :meth:`Target.fake_quant_weight` and
  :meth:`Target.fake_quant_act` are its round-to-nearest weight and activation rules;
* **the lowering**: :meth:`Target.lower_linear` rewrites one annotated linear to the
  target's op; :attr:`Target.linear_ops` lists the ops a lowered linear calls (the one
  list that fusions, the KV-cache rewrite and the exporters ask about);
* **the passes its format implies** (:meth:`Target.implied_passes`, e.g. the int8 lm_head)
  and the adaptations it needs (:meth:`Target.adapt_passes`, e.g. no online Hadamard for a
  file format whose runtime has none): no code outside a target names a pass for a format;
* **the decode step**: :meth:`Target.prepare_step` (fusions on the step graph, kernels);
* **the exporters** that write it exactly (:meth:`Target.export`), with a clear error for a
  format the target cannot be written to.

Packed weights are the format's own classes (:class:`PackedWeight`), registered by format
name (:func:`register_format`) so that annotations and artifacts can store and rebuild them
without knowing the format.

A new target is one folder under ``qqq_compile/targets/`` (its format, kernels, lowering,
exporters and a ``Target`` subclass decorated with :func:`register_target`) plus one import
line in :mod:`qqq_compile.targets.builtin`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from qqq_compile.config import QuantConfig
from qqq_compile.errors import ConfigError


class PackedWeight(Protocol):
    """A quantized weight ``[N, K]`` in some target's storage format."""

    format: ClassVar[str]  # registry name, stored in artifacts
    in_features: int

    @property
    def out_features(self) -> int: ...

    def dequantize(self) -> torch.Tensor:
        """The float ``[N, K]`` weight the format decodes to (exactly what the kernel multiplies)."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role name (what an artifact writes)."""
        ...

    def nbytes(self) -> int: ...

    def bits_per_weight(self) -> float: ...

    def record(self) -> dict[str, Any]:
        """JSON facts besides the tensors that :meth:`from_record` needs (group size...)."""
        ...

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict[str, torch.Tensor], in_features: int) -> PackedWeight: ...


class Grid(Protocol):
    """The values one weight ``[N, K]`` can take in a format, with its final scales fixed.

    ``quantize(col, g)`` rounds one column to codes (float holding integers) and their exact
    decoded values; ``quantize_all`` does the whole weight (int8 codes); ``pack`` turns codes
    (rows ``rows`` of the weight) into the format's :class:`PackedWeight`;
    ``col_group()`` maps each column to its scale group; ``value_table()`` gives every
    code's decoded value per group and row, ``quantize`` being the nearest entry (GPTQ's C++
    column loop reads it; a grid without it takes the torch loop).
    """

    k: int
    group_size: int

    def col_group(self) -> torch.Tensor: ...

    def quantize(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def quantize_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def value_table(self) -> tuple[torch.Tensor, int]: ...

    def pack(self, q4: torch.Tensor, rows: slice = ...) -> PackedWeight: ...


@dataclass
class QuantizedInput:
    """An activation held as a target's kernels consume it: integer codes ``q`` ``[..., K]``
    and per-row scales ``scale`` ``[..., 1]`` (float32); ``dtype``: the float input's."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return self.q.float().mul_(self.scale)


@dataclass(frozen=True)
class ClipSearch:
    """``n_grid`` shrink ratios from 1.0 down to ``min_ratio`` (inclusive)."""

    n_grid: int = 11
    min_ratio: float = 0.6

    def ratios(self) -> list[float]:
        return torch.linspace(1.0, self.min_ratio, self.n_grid).tolist()


def check_clip(n_grid: int, min_ratio: float, where: str) -> None:
    """Reject clip-search options no search can use (raised by the pass configs)."""
    if n_grid < 1:
        raise ConfigError(f"{where}: clip_grid must be >= 1 (number of shrink ratios), got {n_grid}")
    if not 0 < min_ratio <= 1:
        raise ConfigError(f"{where}: clip_min must lie in (0, 1] (smallest shrink ratio, e.g. 0.6), got {min_ratio}")


_FORMATS: dict[str, type] = {}


def register_format(cls: type) -> type:
    """Class decorator: make a packed-weight class rebuildable from its format name."""
    name = getattr(cls, "format", None)
    if not name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'format' (its registry name)")
    if _FORMATS.get(name, cls) is not cls:
        raise ValueError(f"format '{name}' is already registered to {_FORMATS[name]}")
    _FORMATS[name] = cls
    return cls


def format_class(name: str) -> type:
    """The packed-weight class registered as ``name``."""
    if name not in _FORMATS:
        raise KeyError(f"unknown weight format '{name}'; registered: {sorted(_FORMATS)}")
    return _FORMATS[name]


class Target:
    """A weight format plus where it runs; subclass it and decorate with :func:`register_target`.

    The methods below that raise ``NotImplementedError`` are what a target must provide;
    the others have defaults that fit a target without extra passes, fusions or exporters.
    """

    #: Registry name (``QuantConfig.target``, ``--target``).
    name: ClassVar[str] = ""
    #: One line for ``--help`` and errors.
    summary: ClassVar[str] = ""
    #: The group size a config that names none gets.
    default_group_size: ClassVar[int] = -1
    #: The ``QuantConfig.skip`` a config that names none gets: linears kept in float.
    default_skip: ClassVar[tuple[str, ...]] = ("lm_head", "*.lm_head")
    #: Export formats this target can be written to exactly: name -> one-line description.
    export_formats: ClassVar[dict[str, str]] = {}

    # ---------------------------------------------------------------- the format

    def resolve(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with this target's defaults filled in (``group_size=None`` becomes
        :attr:`default_group_size`, ``skip=None`` :attr:`default_skip`), checked: raises
        :class:`ConfigError` for options the format cannot hold."""
        if quant.group_size is None:
            quant = quant.replace(group_size=self.default_group_size)
        if quant.skip is None:
            quant = quant.replace(skip=self.default_skip)
        self.check(quant)
        return quant

    def check(self, quant: QuantConfig) -> None:
        """Raise :class:`ConfigError` for format options this target cannot hold."""

    def grid(
        self,
        w: torch.Tensor,
        quant: QuantConfig,
        group_size: int,
        *,
        clip: Any = None,
        col_weight: torch.Tensor | None = None,
    ) -> Grid:
        """The :class:`Grid` of ``w`` ``[N, K]`` (scales from absmax, or searched with ``clip``,
        weighting columns by ``col_weight``)."""
        raise NotImplementedError

    def quantize_rtn(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> PackedWeight:
        """Round-to-nearest of ``w`` onto the absmax grid."""
        grid = self.grid(w, quant, group_size)
        return grid.pack(grid.quantize_all(w)[0])

    def fake_quant_weight(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> torch.Tensor:
        """Quantize-dequantize ``w`` (round to nearest), in ``w``'s dtype; searches call it often."""
        return self.quantize_rtn(w, quant, group_size).dequantize().to(w.dtype)

    def fake_quant_act(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize an activation ``[..., K]`` exactly as the kernels quantize it."""
        raise NotImplementedError

    def quantize_input(self, x: torch.Tensor) -> QuantizedInput | None:
        """``x`` as this target's kernels consume it (integer codes and scales), or None when
        the target has no such form; GPTQ then keeps :meth:`fake_quant_act`'s float value."""
        return None

    def calib_linear(self, site: Any, packed: PackedWeight) -> Callable[..., Any]:
        """A replacement for the linear node ``site.node`` (a ``LinearSite``) computing what
        the lowered model computes, for calibration runs after GPTQ packed it. Default: the
        input through :meth:`fake_quant_act` times the dequantized weight, in the node's own
        op and argument layout. A target with kernels overrides it to run them."""
        xi = site.x_index()
        wi = 2 if site.node.target == torch.ops.aten.addmm.default else 1
        w_deq = packed.dequantize()
        # aten.linear takes W as [N, K]; mm/addmm/matmul take W.T.
        w_arg = w_deq if site.node.target == torch.ops.aten.linear.default else w_deq.t()
        op = site.node.target

        def run(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            x = args[xi]
            args[xi] = self.fake_quant_act(x)
            args[wi] = w_arg.to(x.dtype)
            return op(*args, **kwargs)

        return run

    def calib_ops(
        self, gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]
    ) -> dict[torch.fx.Node, Callable[..., Any]]:
        """Faster replacements for nodes among ``nodes`` other than linears, for calibration
        runs: the same math on the kernels the deployed model runs (e.g. attention), used
        alike in the quantized and the float run. Default: none."""
        return {}

    # ---------------------------------------------------------------- lowering

    def linear_ops(self) -> tuple[Any, ...]:
        """The ops (``torch._ops.OpOverload``) that a lowered linear of this target calls."""
        return ()

    def lower_linear(self, gm: torch.fx.GraphModule, site: Any, li: Any) -> torch.fx.Node:
        """Insert this target's op for the annotated linear ``site`` (its ``LinearInfo`` ``li``
        holds the packed weight) before ``site.node`` and return the new node; the ``lower``
        pass replaces and erases the old node."""
        raise NotImplementedError

    def config_passes(self, config: Any) -> list[Any]:
        """The passes ``config`` asks of this target, with their options (e.g. the int8 head
        of ``QuantConfig.int8_head``), whatever the pass list."""
        return []

    def implied_passes(self, config: Any, pass_list: Sequence[Any]) -> list[Any]:
        """The :meth:`config_passes` that ``pass_list`` lacks, to run after it. They belong to
        a quantized model: a list that lowers nothing (``passes=[]``, a float graph for
        reference or generation parity) gets none."""
        have = {p.name for p in pass_list}
        if "lower" not in have:
            return []
        return [p for p in self.config_passes(config) if p.name not in have]

    def adapt_passes(self, pass_list: list[Any]) -> tuple[list[Any], list[str]]:
        """``pass_list`` changed where this target's format or runtime needs it, and a note
        for each change. Default: unchanged."""
        return pass_list, []

    # ---------------------------------------------------------------- running

    def prepare_step(self, gm: torch.fx.GraphModule) -> list[str]:
        """Rewrite a decode-step graph in place for speed (fusions); returns notes."""
        return []

    def load_kernels(self) -> bool:
        """Load this target's native kernels before a compiled step runs; False: not available."""
        return True

    def aot_c_shims(self) -> dict[Any, list[str]]:
        """Ops an AOTInductor package may call through C functions of this target's loaded
        native library (``aot_inductor.custom_ops_to_c_shims``: op -> declarations) instead of
        its proxy executor. Default: none."""
        return {}

    # ---------------------------------------------------------------- export

    def export(self, fmt: str, compiled: Any, out: Any, **kwargs: Any) -> Any:
        """Write ``compiled`` as ``fmt`` to ``out``. Raises :class:`ConfigError` naming the
        formats this target can be written to when ``fmt`` is not one of them."""
        writer = self.exporters().get(fmt)
        if writer is None:
            others = [t.name for t in targets() if fmt in t.export_formats]
            hint = f"; quantize with --target {' or '.join(others)} to get a {fmt} file" if others else ""
            raise ConfigError(
                f"a model quantized for target '{self.name}' cannot be written as {fmt}: this target exports "
                f"{', '.join(sorted(self.export_formats)) or 'nothing'}{hint}"
            )
        return writer(compiled, out, **kwargs)

    def exporters(self) -> dict[str, Callable[..., Any]]:
        """``format name -> writer(compiled, out, **kwargs)`` for :attr:`export_formats`."""
        return {}

    def __repr__(self) -> str:
        return f"<target {self.name}: {self.summary}>"


_TARGETS: dict[str, Target] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    if cls.name in _TARGETS and type(_TARGETS[cls.name]) is not cls:
        raise ValueError(f"target '{cls.name}' is already registered to {type(_TARGETS[cls.name]).__name__}")
    _TARGETS[cls.name] = cls()
    return cls


def get_target(name: str) -> Target:
    """The registered target ``name``; a :class:`ConfigError` lists the known ones."""
    if name not in _TARGETS:
        known = ", ".join(f"'{n}' ({t.summary})" for n, t in sorted(_TARGETS.items())) or "none registered"
        raise ConfigError(f"unknown target '{name}'; known targets: {known}")
    return _TARGETS[name]


def targets() -> list[Target]:
    """Every registered target, by name."""
    return [_TARGETS[n] for n in sorted(_TARGETS)]


def graph_targets(gm: torch.fx.GraphModule) -> list[Target]:
    """The registered targets whose lowered-linear ops ``gm`` calls (none for a float graph)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    return [t for t in targets() if called & set(t.linear_ops())]


def lowered_linear_ops() -> tuple[Any, ...]:
    """The ops a lowered linear of any registered target calls."""
    return tuple(op for t in targets() for op in t.linear_ops())


__all__ = [
    "ClipSearch",
    "Grid",
    "PackedWeight",
    "QuantizedInput",
    "check_clip",
    "Target",
    "format_class",
    "get_target",
    "graph_targets",
    "lowered_linear_ops",
    "register_format",
    "register_target",
    "targets",
]
