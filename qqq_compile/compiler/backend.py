"""The ``torch.compile`` backend: ``torch.compile(model, backend="qqq")``.

Dynamo hands the backend a torch-level FX graph whose parameters are graph inputs
(real tensors in ``example_inputs``). The backend freezes those parameters into a
module tree named after their original qualified names, exports that frozen graph to
ATen, runs the pipeline the driver builds from the config (the same as ``compile()``,
``cast_float`` included) and returns the lowered graph. The default backend uses
round-to-nearest W4 (no calibration needed); :func:`qqq_backend` builds one with
calibration data and any preset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.compiler.calibration import calib_batches
from qqq_compile.compiler.capture import export_graph
from qqq_compile.compiler.driver import PassSpec, as_config, build_context, build_passes, run_pipeline
from qqq_compile.compiler.report import Report
from qqq_compile.config import CompileConfig

_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def _source_name(node: torch.fx.Node) -> str:
    ga = node.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", None)
    src = src() if callable(src) else src
    return src or ""


def _param_fqn(node: torch.fx.Node, i: int) -> str:
    parts = _PART.findall(_source_name(node))
    return ".".join(parts) if parts else f"param_{i}"


class _Frozen(torch.nn.Module):
    """Dynamo graph with its parameter inputs turned into module attributes."""

    def __init__(self, gm: GraphModule, consts: dict[int, tuple[str, torch.Tensor]], n_inputs: int):
        super().__init__()
        self.gm = gm
        self.n_inputs = n_inputs
        self.const_names = {}
        for i, (fqn, t) in consts.items():
            *path, leaf = fqn.split(".")
            mod: torch.nn.Module = self
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            if hasattr(mod, leaf):
                fqn = f"param_{i}"
                mod, leaf = self, fqn
            mod.register_buffer(leaf, t.detach(), persistent=False)
            self.const_names[i] = fqn

    def forward(self, *args: Any) -> Any:
        it = iter(args)
        full = []
        for i in range(self.n_inputs):
            if i in self.const_names:
                obj: Any = self
                for p in self.const_names[i].split("."):
                    obj = getattr(obj, p)
                full.append(obj)
            else:
                full.append(next(it))
        return self.gm(*full)


class QQQBackend:
    """A configurable ``torch.compile`` backend (see :func:`qqq_backend`)."""

    def __init__(
        self,
        calib: Any = None,
        config: CompileConfig | dict | None = None,
        passes: Callable[[], Sequence[PassSpec]] | None = None,
        progress: bool = False,
    ):
        self.calib = calib
        self.config = CompileConfig(preset="rtn") if config is None else as_config(config)
        self.passes = passes
        self.progress = progress
        # Bad options fail here, not inside dynamo; the first graph runs this list, later ones
        # (recompiles) get fresh pass objects.
        changes: list[str] = []
        self._first: tuple[list[Any], list[str]] | None = (
            build_passes(self.config, passes() if passes else None, changes),
            changes,
        )
        self.last_graph: GraphModule | None = None  # for inspection and tests
        self.last_report: Report | None = None

    def __call__(self, gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        consts = {
            i: (_param_fqn(n, i), ex)
            for i, (n, ex) in enumerate(zip(placeholders, example_inputs, strict=True))
            if isinstance(ex, torch.nn.Parameter) or re.search(r"_(parameters|buffers)\[", _source_name(n))
        }
        dyn_idx = [i for i in range(len(placeholders)) if i not in consts]
        frozen = _Frozen(gm, consts, len(placeholders))
        compiled: dict[tuple, GraphModule] = {}

        def key(args: Sequence[Any]) -> tuple:
            return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)

        def build(args: list[Any]) -> GraphModule:
            lowered = self._lower(frozen, args)
            compiled[key(args)] = lowered
            return lowered

        def run(*args: Any) -> Any:
            dyn = [args[i] for i in dyn_idx]
            lowered = compiled.get(key(dyn)) or build(dyn)
            out = lowered(*dyn)
            return out

        # Built lazily on the first call: with automatic dynamic shapes the example
        # inputs may hold SymInts, while real calls bring concrete sizes.
        return run

    def _lower(self, frozen: _Frozen, args: list[Any]) -> GraphModule:
        ep_gm = export_graph(frozen, tuple(args), {}, dynamic_shapes=None)
        names = [n.target for n in ep_gm.graph.nodes if n.op == "placeholder"]
        batches = []
        if self.calib is not None:
            tensor_inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            if len(tensor_inputs) != 1:
                raise ValueError("qqq_backend(calib=...) supports graphs with a single token-id tensor input")
            for b in calib_batches(self.calib, batch_size=self.config.calib.batch_size):
                batches.append({names[tensor_inputs[0]]: b["input_ids"]})
        ctx = build_context(self.config, batches, progress=self.progress, device=_device_of(args))
        if self._first is not None:
            (pass_list, changes), self._first = self._first, None
        else:
            changes = []
            pass_list = build_passes(self.config, self.passes() if self.passes else None, changes)
        for msg in changes:
            ctx.note("target", msg)
        out, self.last_report = run_pipeline(ep_gm, ctx, pass_list, config=self.config)
        self.last_graph = out
        return out


def _device_of(args: Sequence[Any]) -> torch.device:
    """Where the graph's tensor inputs live (CPU when there are none)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def qqq_backend(
    calib: Any = None,
    config: CompileConfig | dict | None = None,
    passes: Callable[[], Sequence[PassSpec]] | None = None,
    progress: bool = False,
) -> QQQBackend:
    """A ``torch.compile`` backend with calibration data and a chosen preset.

    ``torch.compile(model, backend=qqq_backend(calib=windows, config=CompileConfig(preset="qqq")))``.
    ``passes`` is a zero-argument factory returning a fresh pass list per compiled graph.
    """
    return QQQBackend(calib, config, passes, progress)


def _default_backend(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    return QQQBackend()(gm, example_inputs)


torch._dynamo.register_backend(name="qqq", compiler_fn=_default_backend)
