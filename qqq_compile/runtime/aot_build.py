"""Compiling a decode step's AOTInductor package, in a child process.

Why a child: AOTInductor's lowering and code generation leave the compiling process about
0.7 GB larger for good (SmolLM2's 2-row step: RSS 660 MB before the compile, 1,362 MB after
it, and still 1,370 MB after generating; export and decompositions add another 0.2 GB). A
server that builds its multi-row step, or a user who asks for a bf16 cache, would carry that
for the life of the process. The child takes the memory with it when it exits.

What the child gets is the step graph without its weights: the FX graph (targets by name),
and for every tensor its name, shape, stride and dtype. A package holds code only
(:mod:`qqq_compile.runtime.steps`), so the compile never reads weight values; the child gives
the graph uninitialised stand-ins (untouched pages: no memory). The tiny tensors Inductor
writes into the code as literals (:func:`inlined`) travel with their values. The parent then
loads the package with the real tensors, as it would a package built anywhere else.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch.fx import Graph, GraphModule
from torch.fx.node import Node, map_aggregate

from qqq_compile.errors import QQQError
from qqq_compile.runtime.kv_cache import CacheSpec, graph_device, lazy_zeros
from qqq_compile.targets.registry import get_target, graph_targets

# How the graph is exported for AOTInductor; part of the package key, so a change rebuilds.
EXPORT_RECIPE = "cache_row+size_oblivious"


class BuildError(QQQError, RuntimeError):
    """The child process that compiles a package failed; the message carries its error."""


def graph_tensors(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``gm`` by qualified name (what an exported program lifts)."""
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def inlined(t: torch.Tensor) -> bool:
    """Tensors Inductor writes into the generated code as literals instead of taking them
    as constants (``GraphLowering.get_attr``/``can_inline_constant`` in torch 2.13: 0-d, or
    1-d with at most 8 elements, e.g. RoPE's ``inv_freq`` of a small head): their values
    are part of the package."""
    return t.dim() == 0 or (t.dim() == 1 and t.shape[0] <= 8)


def c_shims(gm: GraphModule) -> dict[Any, list[str]]:
    """The ops an AOT package of ``gm`` calls through C shims of its targets' native kernels
    (CPU graphs only: AOTInductor names a shim after the device, and the shims are CPU code)."""
    shims: dict[Any, list[str]] = {}
    if graph_device(gm).type != "cpu":
        return shims
    for target in graph_targets(gm):
        shims.update(target.aot_c_shims())
    return shims


def compile_package(cached: GraphModule, spec: CacheSpec, path: Path) -> None:
    """Export ``cached`` with dynamic prompt/context lengths up to ``spec.max_len`` and
    compile it into a code-only package at ``path`` (written atomically), in this process."""
    import torch._inductor.config as inductor_config
    from torch.export import Dim

    b, t = spec.max_batch, spec.max_len
    batch = Dim("batch", min=1, max=b) if b > 1 else None  # a 1-row cache: batch stays static
    seq = Dim("seq", min=1, max=t)
    kv = Dim("kv", min=1, max=t)
    dev = graph_device(cached)
    example = (
        torch.zeros(b, 2, dtype=torch.long, device=dev),
        torch.ones(b, 2, dtype=torch.long, device=dev),
        torch.arange(2, device=dev),
        torch.tensor(0, device=dev),  # cache_row: data-dependent (see kv_cache._first_row)
    )
    dyn = ({0: batch, 1: seq} if batch else {1: seq}, {0: batch, 1: kv} if batch else {1: kv}, {0: seq}, None)
    with torch.no_grad():
        # Size-oblivious: a dynamic batch ranges over [1, max_batch] in export's reasoning (by
        # default it assumes >= 2, and would then fold the cache_row clamp of a 2-row cache to 0).
        with fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(cached, example, dynamic_shapes=dyn, strict=False)
        # Functionalise: KV writes become buffer mutations AOTInductor performs in place. SDPA
        # stays whole: its CPU flash kernel reads the KV heads directly (GQA), where the math
        # decomposition would copy the cache into every query head each step.
        table = torch.export.default_decompositions()
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        ep = ep.run_decompositions(table)
        tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # must still end in .pt2
        # Code only: the weights and the KV cache are handed over at load time (load_package).
        # The C++ kernels are called through their C shims, not the proxy executor.
        patch = {"aot_inductor.package_constants_in_so": False, "aot_inductor.custom_ops_to_c_shims": c_shims(cached)}
        with inductor_config.patch(patch):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    os.replace(tmp, path)  # atomic: a killed compile never leaves a half-written package


# ---------------------------------------------------------------- the graph without weights


def _op_by_name(namespace: str, name: str, overload: str) -> Any:
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


class _Pickler(pickle.Pickler):
    """Pickles ops by name (``torch.ops`` overloads are not picklable): the child resolves
    them once it has loaded the kernels that register them."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch._ops.OpOverload):
            namespace, name = obj._schema.name.split("::", 1)
            return _op_by_name, (namespace, name, obj._overloadname)
        return NotImplemented


@dataclass(frozen=True)
class _Ref:
    """A node argument that is another node, by name."""

    name: str


def _nodes(gm: GraphModule) -> list[tuple[Any, ...]]:
    """``gm``'s graph as a flat list of nodes, without metadata (fake tensors) or owning
    module: pickling the graph itself recurses once per node."""
    return [(n.op, n.name, n.target, _plain(n.args), _plain(n.kwargs)) for n in gm.graph.nodes]


def _plain(a: Any) -> Any:
    """Node arguments in picklable containers (FX's immutable ones are not), nodes by name."""
    if isinstance(a, Node):
        return _Ref(a.name)
    if isinstance(a, tuple):
        return tuple(_plain(x) for x in a)
    if isinstance(a, list):
        return [_plain(x) for x in a]
    if isinstance(a, dict):
        return {k: _plain(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_plain(a.start), _plain(a.stop), _plain(a.step))
    return a


def _graph(nodes: list[tuple[Any, ...]], codegen: Any) -> Graph:
    graph = Graph()
    graph._codegen = codegen
    env: dict[str, Any] = {}

    def resolve(a: Any) -> Any:
        return env[a.name] if isinstance(a, _Ref) else a

    for op, name, target, args, kwargs in nodes:
        args, kwargs = map_aggregate(args, resolve), map_aggregate(kwargs, resolve)
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    return graph


def skeleton(cached: GraphModule, spec: CacheSpec) -> bytes:
    """``cached`` without its weights, as the child reads it (see the module docstring): two
    pickles, the targets whose kernels register the graph's ops, then the graph and tensors."""
    params = {name for name, _ in cached.named_parameters()}
    read = {n.target for n in cached.graph.nodes if n.op == "get_attr"}  # the rest never reaches export
    tensors = {
        name: ("value", t.detach().cpu(), name in params)
        if inlined(t)
        else ("empty", tuple(t.shape), tuple(t.stride()), t.dtype, name in params)
        for name, t in graph_tensors(cached).items()
        if name in read
    }
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump([t.name for t in graph_targets(cached)])
    device = str(graph_device(cached))
    codegen = cached.graph._codegen
    payload = {"nodes": _nodes(cached), "codegen": codegen, "tensors": tensors, "device": device, "spec": spec}
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)  # its own memo: read by a second load
    return buf.getvalue()


def rebuild(blob: bytes) -> tuple[GraphModule, CacheSpec]:
    """The child's side of :func:`skeleton`: the graph module, its tensors uninitialised."""
    stream = io.BytesIO(blob)
    for name in pickle.load(stream):
        get_target(name).load_kernels()  # registers the ops the graph names
    payload = pickle.load(stream)
    device = torch.device(payload["device"])
    root: dict[str, Any] = {}
    for name, entry in payload["tensors"].items():
        if entry[0] == "value":
            t, is_param = entry[1].to(device), entry[2]
        else:
            _, shape, stride, dtype, is_param = entry
            # Untouched pages of an anonymous mapping: the stand-in costs no memory.
            size = sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1 if all(shape) else 0
            t = lazy_zeros((size,), dtype, device).as_strided(shape, stride)
        root[name] = torch.nn.Parameter(t, requires_grad=False) if is_param else t
    return GraphModule(root, _graph(payload["nodes"], payload["codegen"])), payload["spec"]


def compile_in_child(cached: GraphModule, spec: CacheSpec, path: Path) -> None:
    """:func:`compile_package` of ``cached`` run by a child Python process (see the module
    docstring); raises :class:`BuildError` with the child's last lines when it fails."""
    blob = skeleton(cached, spec)
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds qqq_compile/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="qqq-aot-") as tmp:
        payload = Path(tmp) / "step.pickle"
        payload.write_bytes(blob)
        cmd = [sys.executable, "-m", "qqq_compile.runtime.aot_build", str(payload), str(path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not path.exists():
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        # The child's own error (its last line) comes first: runtime="auto" warns with the
        # message's beginning only.
        raise BuildError(
            f"compiling the decode step's AOT package failed in its child process (exit {proc.returncode}): "
            f"{lines[-1] if lines else 'no output'}. The eager step needs no compile: "
            "prepare_generation(runtime='eager'). The child's last lines:\n" + "\n".join(lines[-12:])
        )


def _main(argv: list[str]) -> int:
    payload, path = argv
    gm, spec = rebuild(Path(payload).read_bytes())
    compile_package(gm, spec, Path(path))
    return 0


if __name__ == "__main__":
    # Run as ``python -m``, this file is ``__main__``; the pickle names the package's own module.
    from qqq_compile.runtime import aot_build

    sys.exit(aot_build._main(sys.argv[1:]))
