"""The lowered graph itself, as JSON: what lets ``load()`` skip capture and replay.

Every node is stored with its op, name, target, arguments and ``nn_module_stack``; the
graph attributes (by name, with their kind: parameter, buffer or plain attribute) point
into the artifact's safetensors file; the pytree calling convention (keyword inputs in,
a Hugging Face output object out) is stored with ``treespec_dumps``. Nothing is pickled
and nothing is executed: a call target is resolved only among ``torch.ops`` overloads and
an allow-list of Python operators, so a tampered file can name no other function.

Targets and argument kinds outside that set (a ``call_module`` node, a Python function
found by tracing) make :func:`encode_graph` raise :class:`GraphCodecError`; ``save()``
then writes no graph file, and ``load()`` rebuilds the graph by capture and replay, as
it also does when the file was written by another torch release.
"""

from __future__ import annotations

import importlib
import json
import math
import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import treespec_dumps, treespec_loads

from qqq_compile.targets import builtin  # noqa: F401 - registers the targets' ops, which lowered graphs call

GRAPH_FORMAT = 1
_PY_MODULES = {"operator": operator, "_operator": operator, "math": math}
_TAGS = ("dtype", "layout", "memory_format")


class GraphCodecError(ValueError):
    """The graph holds something this codec does not store (or cannot resolve on load)."""


# ----------------------------------------------------------------------------- encode


def _target(t: Any) -> dict[str, str]:
    if isinstance(t, torch._ops.OpOverload):
        return {"op": f"{t.namespace}::{t._schema.name.split('::', 1)[1]}.{t._overloadname}"}
    mod, name = getattr(t, "__module__", None), getattr(t, "__name__", "")
    if mod in _PY_MODULES and getattr(_PY_MODULES[mod], name, None) is t:
        return {"py": f"{'math' if mod == 'math' else 'operator'}.{name}"}
    if mod == "torch" and name.lstrip("_").startswith("sym_") and getattr(torch, name, None) is t:
        return {"py": f"torch.{name}"}
    raise GraphCodecError(f"call target {t!r} is neither a torch op nor a Python operator")


def _arg(a: Any) -> Any:
    if isinstance(a, Node):
        return {"n": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"f": str(a)}
    if isinstance(a, tuple):
        return {"t": [_arg(x) for x in a]}
    if isinstance(a, list):
        return [_arg(x) for x in a]
    if isinstance(a, dict):
        return {"d": [[k, _arg(v)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, slice):
        return {"slice": [_arg(a.start), _arg(a.stop), _arg(a.step)]}
    raise GraphCodecError(f"a node argument of type {type(a).__name__} ({a!r:.60})")


def _attr_kind(gm: GraphModule, target: str) -> str:
    *path, last = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if last in mod._parameters:
        return "parameter"
    return "buffer" if last in mod._buffers else "attribute"


def encode_graph(gm: GraphModule, annotations: dict[str, Any]) -> dict[str, Any]:
    """``gm`` as JSON; ``annotations`` (node name → JSON) are stored with their nodes."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise GraphCodecError(f"node {n.name} is a {n.op}")
        rec: dict[str, Any] = {
            "name": n.name,
            "op": n.op,
            "target": _target(n.target) if n.op == "call_function" else n.target,
            "args": [_arg(x) for x in n.args],
            "kwargs": [[k, _arg(v)] for k, v in n.kwargs.items()],
        }
        stack = n.meta.get("nn_module_stack")
        if stack:
            rec["nn_module_stack"] = [
                [k, path, ty if isinstance(ty, str) else f"{ty.__module__}.{ty.__qualname__}"]
                for k, (path, ty) in stack.items()
            ]
        if n.name in annotations:
            rec["qqq"] = annotations[n.name]
        nodes.append(rec)
    out: dict[str, Any] = {
        "graph_format": GRAPH_FORMAT,
        "nodes": nodes,
        "attrs": {n.target: _attr_kind(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"},
    }
    cg = gm.graph._codegen
    if isinstance(cg, _PyTreeCodeGen):
        info = cg.pytree_info
        out["pytree"] = {
            "orig_args": list(info.orig_args),
            "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    return out


# ----------------------------------------------------------------------------- decode


def _resolve(t: dict[str, str]) -> Any:
    try:
        if "op" in t:
            ns, rest = t["op"].split("::", 1)
            name, overload = rest.rsplit(".", 1)
            return getattr(getattr(getattr(torch.ops, ns), name), overload)
        mod, name = t["py"].split(".", 1)
        fn = getattr({"operator": operator, "math": math, "torch": torch}[mod], name)
        if mod == "torch" and not name.lstrip("_").startswith("sym_"):
            raise KeyError(name)
        return fn
    except (AttributeError, KeyError, ValueError, RuntimeError) as e:
        raise GraphCodecError(f"call target {t} does not exist in this torch ({torch.__version__})") from e


def _value(a: Any, env: dict[str, Node]) -> Any:
    if isinstance(a, list):
        return [_value(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    ((k, v),) = a.items()
    if k == "n":
        return env[v]
    if k == "t":
        return tuple(_value(x, env) for x in v)
    if k == "d":
        return {kk: _value(vv, env) for kk, vv in v}
    if k == "f":
        return float(v)
    if k in _TAGS:
        got = getattr(torch, v, None)
        if got is None:
            raise GraphCodecError(f"torch.{v} does not exist in this torch ({torch.__version__})")
        return got
    if k == "device":
        return torch.device(v)
    if k == "slice":
        return slice(*(_value(x, env) for x in v))
    raise GraphCodecError(f"unknown argument tag {k!r}")


def _spec(text: str | None) -> Any:
    if text is None:
        return None
    # Output classes (CausalLMOutputWithPast...) are pytree nodes once their module is imported.
    for mod in {m.rsplit(".", 1)[0] for m in _types(text)}:
        if mod.startswith("transformers."):
            importlib.import_module(mod)
    return treespec_loads(text)


def _types(text: str) -> list[str]:
    found: list[str] = []

    def walk(d: Any) -> None:
        if isinstance(d, dict):
            if isinstance(d.get("type"), str):
                found.append(d["type"])
            for v in d.values():
                walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    walk(json.loads(text))
    return found


def decode_graph(d: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[GraphModule, dict[str, Any]]:
    """``(GraphModule, node name → annotation JSON)`` from :func:`encode_graph` output;
    attributes are taken from ``tensors`` by name."""
    if d.get("graph_format") != GRAPH_FORMAT:
        raise GraphCodecError(f"graph format {d.get('graph_format')!r} is not {GRAPH_FORMAT}")
    g = Graph()
    env: dict[str, Node] = {}
    annotations = {}
    for rec in d["nodes"]:
        op = rec["op"]
        target = _resolve(rec["target"]) if op == "call_function" else rec["target"]
        args = tuple(_value(x, env) for x in rec["args"])
        kwargs = {k: _value(v, env) for k, v in rec["kwargs"]}
        n = g.create_node(op, target, args, kwargs, name=rec["name"])
        if n.name != rec["name"]:
            raise GraphCodecError(f"node name {rec['name']!r} came back as {n.name!r}")
        if "nn_module_stack" in rec:
            n.meta["nn_module_stack"] = {k: (path, ty) for k, path, ty in rec["nn_module_stack"]}
        if "qqq" in rec:
            annotations[n.name] = rec["qqq"]
        env[n.name] = n
    root = torch.nn.Module()
    for target, kind in d["attrs"].items():
        *path, last = target.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if target not in tensors:
            raise GraphCodecError(f"graph attribute {target!r} is not among the saved tensors")
        t = tensors[target]
        if kind == "parameter":
            mod.register_parameter(last, torch.nn.Parameter(t, requires_grad=False))
        elif kind == "buffer":
            mod.register_buffer(last, t)
        else:
            setattr(mod, last, t)
    if d.get("pytree"):
        pt = d["pytree"]
        g.set_codegen(_PyTreeCodeGen(_PyTreeInfo(pt["orig_args"], _spec(pt["in_spec"]), _spec(pt["out_spec"]))))
    g.lint()
    return GraphModule(root, g), annotations


def restore_shapes(gm: GraphModule, example: dict[str, torch.Tensor]) -> None:
    """Set ``node.meta["val"]`` (fake tensors) by propagating ``example`` through the graph.

    Sizes are those of the example (static), where capture leaves symbolic batch and
    sequence sizes: dtypes, ranks and the model's own dims (hidden size, heads...) are the
    same, which is what exporters and passes read. Symbolic propagation gives the exact
    captured metadata but takes ten times longer (12.8 s against 1.3 s for SmolLM2).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(example[n.target]) for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
