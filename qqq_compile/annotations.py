"""The annotations passes leave on a graph, their schema, and the one JSON codec that
artifacts and reports use for them.

Schema:

* ``node.meta["qqq"]`` on a linear site: its :class:`~qqq_compile.graph.LinearInfo`
  (``graph.info(node)`` reads it).
* other per-node facts: the smoothing record of the linear's group, the role a linear
  plays in the rotation (``"reader"``, ``"writer"``, ``"writer+online_hadamard"``), the
  size of an online Hadamard transform a node applies, whether a consumer reads a weight
  that ``cast_float`` stored in another dtype. :func:`node_annotation` gathers them all
  into one :class:`NodeAnnotation`; :func:`set_node_annotation` writes one back.
* ``gm.meta["qqq"]``: a :class:`GraphAnnotation` with the per-pass state that
  ``replay()`` methods need at load time (:func:`set_replay_state`).

The per-node facts other than ``LinearInfo`` are still stored under the keys in
:data:`NODE_KEYS` because the passes that write them (``smooth``, ``rotate``,
``cast_float``) and the readers in ``inspect``/``export`` are being changed elsewhere;
going through the functions here keeps working when they move into ``meta["qqq"]``.

Codec: :func:`encode_linear`/:func:`decode_linear` (one linear's facts as the JSON record
an artifact's manifest lists, tensors by key into a side table) and
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

from .formats import PackedW4
from .graph import LinearInfo, info

KEY = "qqq"
#: Where each per-node fact other than ``LinearInfo`` is stored (see the module docstring).
NODE_KEYS = {
    "smooth": "qqq_smooth",
    "rotate": "qqq_rotate",
    "online_hadamard": "qqq_online_hadamard",
    "float_cast": "qqq_float_cast",
}
_LEGACY_REPLAY = "qqq_replay"  # gm.meta key of format 1.0


@dataclass
class NodeAnnotation:
    """Everything qqq_compile records about one node."""

    linear: LinearInfo | None = None
    smooth: Any = None  # passes.smooth.SmoothRecord (typed loosely: annotations sit below the passes)
    rotate: str | None = None
    online_hadamard: int | None = None
    float_cast: bool = False

    def is_empty(self) -> bool:
        return self == NodeAnnotation()


@dataclass
class GraphAnnotation:
    """``gm.meta["qqq"]``: ``replay`` maps a pass name to the JSON-able state its
    ``replay(gm, ctx, state)`` needs to rebuild its rewrite at load time."""

    replay: dict[str, Any] = field(default_factory=dict)


def node_annotation(node: Node) -> NodeAnnotation:
    """All annotations of ``node`` (a fresh view; change it with :func:`set_node_annotation`)."""
    li = info(node)
    return NodeAnnotation(
        linear=li if isinstance(li, LinearInfo) else None,
        **{k: node.meta.get(key) for k, key in NODE_KEYS.items() if k != "float_cast"},
        float_cast=bool(node.meta.get(NODE_KEYS["float_cast"])),
    )


def set_node_annotation(node: Node, ann: NodeAnnotation) -> None:
    if ann.linear is not None:
        node.meta[KEY] = ann.linear
    for k, key in NODE_KEYS.items():
        v = getattr(ann, k)
        if v is None or v is False:
            node.meta.pop(key, None)
        else:
            node.meta[key] = v


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
        rec.update(
            format="w4a8",
            bits=4,
            act_bits=8,
            group_size=p.group_size,
            group_scale_dtype=p.group_scale_dtype,
            bits_per_weight=p.bits_per_weight(),
            tensors={k: base + k for k in p.tensors()},
        )
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
        li.packed = PackedW4(t["qweight"], t["channel_scale"], t.get("group_scale"), in_f, rec["group_size"])
    smooth = rec.get("smooth_record")
    return li, (decode_value(smooth, tensors) if smooth else None)


def encode_node(node: Node, base: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """All of ``node``'s annotations as JSON (None when it has none)."""
    ann = node_annotation(node)
    if ann.is_empty():
        return None
    out: dict[str, Any] = {}
    if ann.linear is not None:
        out["linear"] = encode_linear(ann.linear, base, tensors, ann.smooth)
    elif ann.smooth is not None:
        out["smooth"] = encode_value(ann.smooth, base + "smooth", tensors)
    for k in ("rotate", "online_hadamard", "float_cast"):
        if getattr(ann, k) not in (None, False):
            out[k] = getattr(ann, k)
    return out


def decode_node(d: dict[str, Any], tensors: dict[str, torch.Tensor]) -> NodeAnnotation:
    ann = NodeAnnotation(rotate=d.get("rotate"), online_hadamard=d.get("online_hadamard"))
    ann.float_cast = bool(d.get("float_cast"))
    if "linear" in d:
        ann.linear, ann.smooth = decode_linear(d["linear"], tensors)
    elif "smooth" in d:
        ann.smooth = decode_value(d["smooth"], tensors)
    return ann


def _float(x: Any) -> float | None:
    return None if x is None else float(x)
