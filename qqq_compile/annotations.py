"""The annotations passes leave on a graph, their schema, and the one JSON codec that
artifacts and reports use for them.

Schema:

* ``node.meta["qqq"]``: one :class:`NodeAnnotation` per annotated node, holding every
  fact qqq_compile records about it: the linear's :class:`LinearInfo` (``graph.info(node)``
  reads it), the smoothing record of the linear's group, the role a linear plays in the
  rotation (``"reader"``, ``"writer"``, ``"writer+online_hadamard"``), the size of an
  online Hadamard transform a node applies, whether a consumer reads a weight that
  ``cast_float`` stored in another dtype, and what an ``int8_head`` rewrite replaced
  (``{"replaced": "linear", "fqn": ...}`` on the W8A8 head, ``{"replaced": "embedding",
  "weight": ...}`` on the int8 lookup's output).
* ``gm.meta["qqq"]``: a :class:`GraphAnnotation` with the per-pass state that
  ``replay()`` methods need at load time (:func:`set_replay_state`).

Passes and readers go through the functions here, never through ``node.meta`` directly:
:func:`node_annotation` (read), :func:`annotate` (change some fields),
:func:`set_node_annotation` (replace), :func:`linear_info`. Writes are copy-on-write: a
pass that copies a node's ``meta`` into a new node shares the annotation, and a later
write to one node must not change the other (as it did not with one key per fact).

Legacy: code written before the facts moved into ``meta["qqq"]`` stored a bare
``LinearInfo`` there and the other facts under :data:`LEGACY_NODE_KEYS`; such nodes are
read as if annotated here, and the next write moves them. Artifacts never stored those
keys (their codec below names the fields), and ``gm.meta["qqq_replay"]`` (format 1.0)
is taken over by :func:`graph_annotation`.

Codec: :func:`encode_linear`/:func:`decode_linear` (one linear's facts as the JSON record
an artifact's manifest lists, tensors by key into a side table),
:func:`encode_node`/:func:`decode_node` (a whole annotation, for the graph file) and
:func:`encode_value`/:func:`decode_value` (any annotation value: dataclasses, tensors,
non-finite floats).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.targets.registry import PackedWeight, format_class

KEY = "qqq"
#: Where code before the one annotation kept each fact (read, never written; see above).
LEGACY_NODE_KEYS = {
    "smooth": "qqq_smooth",
    "rotate": "qqq_rotate",
    "online_hadamard": "qqq_online_hadamard",
    "float_cast": "qqq_float_cast",
    "int8_head": "qqq_int8_head",
}
#: The facts other than ``linear``, as the codec names them.
EXTRA_FIELDS = ("rotate", "online_hadamard", "float_cast", "int8_head")
_LEGACY_REPLAY = "qqq_replay"  # gm.meta key of format 1.0
#: Where the classes an artifact may name (smoothing records) lived before the layout of
#: ``compiler/`` and ``targets/``: decoded from their new home.
_MOVED_MODULES = {"qqq_compile.passes": "qqq_compile.compiler.passes"}


@dataclass
class LinearInfo:
    """Facts about one linear site (``NodeAnnotation.linear``), written by analysis passes."""

    fqn: str
    in_features: int
    out_features: int
    act_absmax: torch.Tensor | None = None  # [K] max |x| per input channel
    act_samples: int = 0
    hessian: torch.Tensor | None = None  # [K, K] fp32, 2/n * X^T X
    smooth_group: str | None = None
    smooth_scale_range: tuple[float, float] | None = None
    gptq: dict[str, Any] | None = None  # damping used, retries, loss
    packed: PackedWeight | None = None  # the target format's packed weight
    method: str | None = None  # "rtn" | "gptq"
    weight_sqnr_db: float | None = None
    lowered: bool = False
    skipped: str | None = None  # why it stays in float


@dataclass
class NodeAnnotation:
    """Everything qqq_compile records about one node (``node.meta["qqq"]``)."""

    linear: LinearInfo | None = None
    smooth: Any = None  # passes.smooth.SmoothRecord (typed loosely: annotations sit below the passes)
    rotate: str | None = None
    online_hadamard: int | None = None
    float_cast: bool = False
    int8_head: dict[str, str] | None = None  # what the int8_head pass replaced with this node

    def is_empty(self) -> bool:
        return self == NodeAnnotation()


@dataclass
class GraphAnnotation:
    """``gm.meta["qqq"]``: ``replay`` maps a pass name to the JSON-able state its
    ``replay(gm, ctx, state)`` needs to rebuild its rewrite at load time."""

    replay: dict[str, Any] = field(default_factory=dict)


_EMPTY = NodeAnnotation()


def _stored(node: Node) -> NodeAnnotation:
    """The annotation as stored (shared: do not change it), legacy keys included."""
    meta = node.meta
    v = meta.get(KEY)
    if isinstance(v, NodeAnnotation) and not any(k in meta for k in LEGACY_NODE_KEYS.values()):
        return v
    return _from_legacy(meta)


def _from_legacy(meta: dict[str, Any]) -> NodeAnnotation:
    v = meta.get(KEY)
    ann = dataclasses.replace(v) if isinstance(v, NodeAnnotation) else NodeAnnotation()
    if isinstance(v, LinearInfo):  # a bare LinearInfo: meta["qqq"] before the one annotation
        ann.linear = v
    for name, key in LEGACY_NODE_KEYS.items():
        if meta.get(key) is not None:
            value = meta[key]
            setattr(ann, name, bool(value) if name == "float_cast" else dict(value) if name == "int8_head" else value)
    return ann if ann != _EMPTY else _EMPTY


def node_annotation(node: Node) -> NodeAnnotation:
    """All annotations of ``node``: a copy (change them with :func:`annotate` or
    :func:`set_node_annotation`); the ``LinearInfo`` in it is the node's own."""
    return dataclasses.replace(_stored(node))


def linear_info(node: Node) -> LinearInfo | None:
    """The node's :class:`LinearInfo` (None unless it is an annotated linear site)."""
    return _stored(node).linear


def set_node_annotation(node: Node, ann: NodeAnnotation) -> None:
    """Store ``ann`` as all of ``node``'s annotations (an empty one removes them)."""
    for key in LEGACY_NODE_KEYS.values():
        node.meta.pop(key, None)
    if ann.is_empty():
        node.meta.pop(KEY, None)
    else:
        node.meta[KEY] = ann


def annotate(node: Node, **fields: Any) -> NodeAnnotation:
    """Set some of ``node``'s annotation fields (``annotate(n, rotate="reader")``),
    keeping the others; returns the new annotation. Unknown field names raise TypeError."""
    ann = dataclasses.replace(_stored(node), **fields)
    set_node_annotation(node, ann)
    return ann


def graph_annotation(gm: GraphModule) -> GraphAnnotation:
    """The graph's :class:`GraphAnnotation`, created on first use (a format 1.0 replay
    table found under the old key is taken over)."""
    ann = gm.meta.get(KEY)
    if not isinstance(ann, GraphAnnotation):
        ann = gm.meta[KEY] = GraphAnnotation(dict(gm.meta.pop(_LEGACY_REPLAY, None) or {}))
    return ann


def set_replay_state(gm: GraphModule, pass_name: str, state: Any) -> None:
    """Record what ``pass_name``'s ``replay()`` needs (JSON-able: numbers, strings, lists, dicts)."""
    graph_annotation(gm).replay[pass_name] = state


def replay_states(gm: GraphModule) -> dict[str, Any]:
    return dict(graph_annotation(gm).replay)


# ----------------------------------------------------------------------------- codec


def encode_value(v: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``v`` as JSON: tensors go into ``tensors`` (under ``key`` and a suffix) and are
    referenced as ``{"tensor": key}``; our dataclasses become ``{"class", "fields"}``."""
    if isinstance(v, torch.Tensor):
        tensors[key] = v
        return {"tensor": key}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: encode_value(getattr(v, f.name), f"{key}/{f.name}", tensors) for f in dataclasses.fields(v)}
        return {"class": f"{type(v).__module__}.{type(v).__qualname__}", "fields": fields}
    if isinstance(v, dict):
        return {str(k): encode_value(x, f"{key}/{k}", tensors) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encode_value(x, f"{key}/{i}", tensors) for i, x in enumerate(v)]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return str(v)


def decode_value(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_value`. A dataclass whose class is gone (or not ours:
    only ``qqq_compile.*`` classes are ever imported) comes back as a namespace."""
    if isinstance(v, list):
        return [decode_value(x, tensors) for x in v]
    if v in ("inf", "-inf", "nan"):
        return float(v)
    if not isinstance(v, dict):
        return v
    if set(v) == {"tensor"}:
        return tensors[v["tensor"]]
    if set(v) == {"class", "fields"}:
        kw = {k: decode_value(x, tensors) for k, x in v["fields"].items()}
        module, _, name = str(v["class"]).rpartition(".")
        for old, new in _MOVED_MODULES.items():  # artifacts written before the package moved
            if module == old or module.startswith(old + "."):
                module = new + module[len(old) :]
                break
        if module.startswith("qqq_compile."):
            try:
                cls = getattr(importlib.import_module(module), name)
                names = {f.name for f in dataclasses.fields(cls)}
                return cls(**{k: x for k, x in kw.items() if k in names})
            except (ImportError, AttributeError, TypeError):
                pass
        return types.SimpleNamespace(**kw)
    return {k: decode_value(x, tensors) for k, x in v.items()}


def encode_linear(li: LinearInfo, base: str, tensors: dict[str, torch.Tensor], smooth: Any = None) -> dict[str, Any]:
    """One linear's facts as the report record artifacts list (``"layers"``). Tensors
    (packed weight, observed ``max |x|``, the smoothing record's scales) go into
    ``tensors`` under keys starting with ``base``. The Hessian is not kept."""
    rec: dict[str, Any] = {
        "name": li.fqn,
        "shape": [li.out_features, li.in_features],
        "method": li.method,
        "smoothed": li.smooth_group is not None,
        "smooth_group": li.smooth_group,
        "smooth_scale_range": li.smooth_scale_range,
        "gptq": li.gptq,
        "lowered": li.lowered,
        "skipped": li.skipped,
        "weight_sqnr_db": li.weight_sqnr_db,
        "act_samples": li.act_samples,
    }
    if li.act_absmax is not None:
        rec["act_absmax"] = base + "act_absmax"
        tensors[base + "act_absmax"] = li.act_absmax
    p = li.packed
    if p is None:
        rec.update(format="float", bits=None, group_size=None, group_scale_dtype=None, tensors=None)
    else:
        rec.update(format=p.format, **p.record(), tensors={k: base + k for k in p.tensors()})
        tensors.update({base + k: t for k, t in p.tensors().items()})
    if dataclasses.is_dataclass(smooth) and not isinstance(smooth, type):
        rec["smooth_record"] = encode_value(smooth, base + "smooth", tensors)
    return rec


def decode_linear(rec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[LinearInfo, Any]:
    """``(LinearInfo, smoothing record or None)`` from an :func:`encode_linear` record."""
    out_f, in_f = rec["shape"]
    li = LinearInfo(rec["name"], in_f, out_f)
    li.method, li.skipped, li.gptq = rec.get("method"), rec.get("skipped"), rec.get("gptq")
    li.lowered = bool(rec.get("lowered"))
    li.smooth_group = rec.get("smooth_group")
    rng = rec.get("smooth_scale_range")
    li.smooth_scale_range = tuple(rng) if rng else None
    li.weight_sqnr_db = _float(rec.get("weight_sqnr_db"))
    li.act_samples = int(rec.get("act_samples") or 0)
    if rec.get("act_absmax"):
        li.act_absmax = tensors[rec["act_absmax"]]
    if rec.get("tensors"):
        t = {k: tensors[v] for k, v in rec["tensors"].items()}
        li.packed = format_class(rec.get("format", "w4a8")).from_record(rec, t, in_f)
    smooth = rec.get("smooth_record")
    return li, (decode_value(smooth, tensors) if smooth else None)


def encode_node(node: Node, base: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """All of ``node``'s annotations as JSON (None when it has none)."""
    ann = _stored(node)
    if ann.is_empty():
        return None
    out: dict[str, Any] = {}
    if ann.linear is not None:
        out["linear"] = encode_linear(ann.linear, base, tensors, ann.smooth)
    elif ann.smooth is not None:
        out["smooth"] = encode_value(ann.smooth, base + "smooth", tensors)
    out.update(encode_extras(ann))
    return out


def encode_extras(ann: NodeAnnotation) -> dict[str, Any]:
    """The facts of ``ann`` other than the linear and its smoothing record, as JSON."""
    return {k: getattr(ann, k) for k in EXTRA_FIELDS if getattr(ann, k) not in (None, False)}


def decode_node(
    d: dict[str, Any], tensors: dict[str, torch.Tensor], layers: list[dict[str, Any]] | None = None
) -> NodeAnnotation:
    """The inverse of :func:`encode_node`. A graph file's entry for a linear points at its
    manifest record instead (``{"layer": i, ...}``, ``layers`` = the manifest's list).
    Fields this version does not know (a later minor format) are ignored."""
    ann = NodeAnnotation(rotate=d.get("rotate"), online_hadamard=d.get("online_hadamard"))
    ann.float_cast = bool(d.get("float_cast"))
    if d.get("int8_head"):
        ann.int8_head = {str(k): str(v) for k, v in d["int8_head"].items()}
    if "layer" in d:
        if layers is None:
            raise KeyError(f"node record {d} points at linear record {d['layer']}, but no records were given")
        ann.linear, ann.smooth = decode_linear(layers[d["layer"]], tensors)
    elif "linear" in d:
        ann.linear, ann.smooth = decode_linear(d["linear"], tensors)
    elif "smooth" in d:
        ann.smooth = decode_value(d["smooth"], tensors)
    return ann


def _float(x: Any) -> float | None:
    return None if x is None else float(x)
