"""The driver: the one place that turns a config into a pass list and runs it.

``compile()``, the blockwise fallback, the streaming path, the ``torch.compile`` backend
and ``load()`` (replaying a saved pipeline) all go through these functions:

* :func:`build_context` — the :class:`~qqq_compile.compiler.pipeline.CompileContext` of a
  config (its format resolved by its target), calibration batches and device;
* :func:`build_passes` — the preset the config names (or the explicit passes), plus the
  passes the config implies (``cast_float`` when ``QuantConfig.float_weight_dtype`` is
  set, the target's own such as W4A8's ``int8_head`` when the list lowers), adapted by the
  target, checked against what each pass ``requires``;
* :func:`run_pipeline` — runs a pass list over a graph with instruments and returns the
  graph and its :class:`~qqq_compile.compiler.report.Report`;
* :func:`replay_passes` — the same pass list, each pass wrapped to do at load time what
  its ``replay_mode`` declares.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.passes.cast_float import CastFloatWeights
from qqq_compile.compiler.pipeline import (
    CompileContext,
    DumpGraphs,
    Instrument,
    NumericCheck,
    PassResult,
    Pipeline,
    QQQPass,
    pass_from_dict,
)
from qqq_compile.compiler.presets import get_preset
from qqq_compile.compiler.report import Report
from qqq_compile.config import CompileConfig, ConfigError
from qqq_compile.errors import PipelineError
from qqq_compile.graph import TRANSPARENT, get_attr, info
from qqq_compile.targets import builtin  # noqa: F401 - registers the shipped targets
from qqq_compile.targets.registry import get_target

PassSpec = QQQPass | dict[str, Any]


def as_config(config: CompileConfig | dict[str, Any] | None) -> CompileConfig:
    """``config`` as a :class:`CompileConfig` (a dict is parsed, unknown keys rejected)."""
    if config is None:
        return CompileConfig()
    if isinstance(config, dict):
        return CompileConfig.from_dict(config)
    if not isinstance(config, CompileConfig):
        raise ConfigError(f"config must be a CompileConfig or a dict, got {type(config).__name__}")
    return config


def build_context(
    config: CompileConfig | dict[str, Any] | None,
    calib: Sequence[dict[str, Any]] = (),
    *,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> CompileContext:
    """The :class:`CompileContext` every entry path compiles with (``compile()``, the
    blockwise fallback, streaming, the ``torch.compile`` backend, artifact replay): the
    config's format resolved by its target, its calibration settings, ``calib`` (batches of
    graph inputs) and the ``device`` passes compute on (default: CPU)."""
    config = as_config(config)
    return CompileContext(
        calib=list(calib),
        quant=config.quant,
        calib_config=config.calib,
        device=torch.device(device) if device is not None else torch.device("cpu"),
        progress=progress,
    )


def config_passes(config: CompileConfig) -> list[QQQPass]:
    """The passes the config itself asks for, with the options it gives them:
    ``cast_float`` for ``QuantConfig.float_weight_dtype`` (it reads the dtype from the
    context), then what the config asks of its target (:meth:`Target.config_passes`: for
    W4A8, ``int8_head`` with the embedding for ``QuantConfig.int8_head``)."""
    out: list[QQQPass] = [CastFloatWeights()] if config.quant.float_weight_dtype else []
    return out + get_target(config.quant.target).config_passes(config)


def implied_passes(config: CompileConfig, pass_list: Sequence[QQQPass]) -> list[QQQPass]:
    """The :func:`config_passes` that ``pass_list`` lacks, to run after it: ``cast_float``,
    then the target's (:meth:`Target.implied_passes`: only for a list that lowers)."""
    have = {p.name for p in pass_list}
    out: list[QQQPass] = [CastFloatWeights()] if config.quant.float_weight_dtype and "cast_float" not in have else []
    return out + get_target(config.quant.target).implied_passes(config, pass_list)


def build_passes(
    config: CompileConfig | dict[str, Any] | None,
    passes: Sequence[PassSpec] | None = None,
    notes: list[str] | None = None,
) -> list[QQQPass]:
    """The pass list a compile with ``config`` runs.

    ``passes`` overrides the preset: pass objects, or specs ``{"name": ..., "options": {...}}``
    (``QQQPass.to_dict()``) rebuilt from the pass registry. Passes the config implies are
    appended (:func:`implied_passes`), and the config's target adapts the list to what its
    format and runtime can hold (:meth:`Target.adapt_passes`; each change is appended to
    ``notes`` when given). Raises :class:`PipelineError` when a pass needs another one before
    it that the list lacks.
    """
    config = as_config(config)
    if passes is None:
        pass_list = get_preset(config.preset, **config.preset_options)
    else:
        pass_list = [p if isinstance(p, QQQPass) else pass_from_dict(p) for p in passes]
    pass_list = [*pass_list, *implied_passes(config, pass_list)]
    pass_list, changes = get_target(config.quant.target).adapt_passes(pass_list)
    if notes is not None:
        notes.extend(changes)
    check_order(pass_list)
    return pass_list


def check_order(pass_list: Sequence[QQQPass]) -> None:
    """Every pass named in a pass's ``requires`` runs before it."""
    names = [p.name for p in pass_list]
    for i, p in enumerate(pass_list):
        for need in getattr(p, "requires", ()):
            if need != "calib" and need not in names[:i]:
                raise PipelineError(
                    p.name, i, names[:i], f"it needs pass '{need}' to run before it; add it earlier in the pass list"
                )


def check_calib(pass_list: Sequence[QQQPass], ctx: CompileContext) -> None:
    """Fail before any work when a pass needs calibration data and there is none."""
    names = [p.name for p in pass_list]
    for i, p in enumerate(pass_list):
        if "calib" in getattr(p, "requires", ()) and not ctx.calib:
            raise PipelineError(
                p.name,
                i,
                names[:i],
                f"pass '{p.name}' needs calibration data, but none was given: pass calib=... to "
                "qqq_compile.compile (token-id tensors or a text source)",
            )


def run_pipeline(
    gm: GraphModule,
    ctx: CompileContext,
    pass_list: Sequence[QQQPass],
    instruments: Sequence[Instrument] = (),
    *,
    config: CompileConfig | None = None,
    dump_dir: str | os.PathLike | None = None,
    numeric_check: NumericCheck | None = None,
    scope: str | None = None,
) -> tuple[GraphModule, Report]:
    """Run ``pass_list`` over ``gm``; returns the final graph and the report.

    ``dump_dir`` adds a :class:`~qqq_compile.compiler.pipeline.DumpGraphs` instrument. ``scope``
    names the part of a model this graph is (a decoder block on the blockwise path): it
    prefixes notes and errors. The report lists the exact passes (``pass_configs``), which
    is what an artifact stores to replay them.
    """
    check_calib(pass_list, ctx)
    inst = list(instruments) + ([DumpGraphs(dump_dir)] if dump_dir else [])
    pipeline = Pipeline(pass_list, inst, numeric_check)
    try:
        result = pipeline.run(gm, ctx)
    except PipelineError as e:
        if scope is None:
            raise
        raise PipelineError(e.pass_name, e.index, e.before, f"in {scope}: {e.__cause__ or e}") from e
    kept = float_weights_note(result.graph_module)
    if kept:
        ctx.note("compile", f"{scope}: {kept}" if scope else kept, scope)
    report = Report(
        pipeline.records,
        list(ctx.notes),
        # The format as its target resolved it (group size filled in): what an artifact stores.
        config.replace(quant=ctx.quant).to_dict() if config is not None else {},
        [p.name for p in pass_list],
        [p.to_dict() for p in pass_list],
    )
    return result.graph_module, report


class Replay(QQQPass):
    """One saved pass as ``load()`` runs it: ``call()`` again (``"rerun"``), ``replay()``
    with its recorded state (``"state"``) or nothing (``"tensors"``: its effect comes
    back with the saved tensors)."""

    def __init__(self, inner: QQQPass, state: Any = None):
        super().__init__()
        self.inner, self.state = inner, state
        self.name = inner.name
        self.mode = inner.effective_replay_mode()

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        if self.mode == "rerun":
            return self.inner.call(graph_module, ctx)
        if self.mode == "state":
            return self.inner.replay(graph_module, ctx, self.state)  # type: ignore[attr-defined]
        return PassResult(graph_module, False)


def replay_passes(pass_list: Sequence[QQQPass], states: dict[str, Any]) -> list[QQQPass]:
    """``pass_list`` wrapped for replay at load time (see :class:`Replay`)."""
    return [Replay(p, states.get(p.name)) for p in pass_list]


# ----------------------------------------------------------------------------- report notes

aten = torch.ops.aten
# Views a weight may pass through on its way to the op that reads it.
_VIEWS = TRANSPARENT | {
    aten.t.default,
    aten.permute.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.squeeze.dim,
    aten.squeeze.default,
}


def _target_op(n: Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "namespace", None) == "qqq"


def float_weights_note(gm: GraphModule) -> str | None:
    """Name every weight (float tensor, 2-D or more) the graph reads outside a linear
    site: embeddings, convolutions, ops no pass matches (einsum → bmm...). They stay in
    float and keep working; the report says so. (Linears kept in float are listed by
    ``CompiledModel.linears()`` with their reason instead.)"""

    def ends(n: Node) -> list[Node]:
        return [e for u in n.users for e in (ends(u) if u.target in _VIEWS and info(u) is None else [u])]

    found = []
    for n in gm.graph.nodes:
        t = get_attr(gm, n.target) if n.op == "get_attr" else None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            continue
        users = ends(n)
        # Tensors read only by a target's own ops (the ``qqq`` namespace: a GGUF target's fp16
        # block scales) are in that target's format, not float weights left behind.
        if users and all(info(u) is None and not _target_op(u) for u in users):
            ops = sorted({str(getattr(u.target, "overloadpacket", u.target)).removeprefix("aten.") for u in users})
            found.append(f"{n.target} {list(t.shape)} ({', '.join(ops)})")
    return "weights kept in float (no quantized rewrite for their ops): " + "; ".join(found) if found else None
