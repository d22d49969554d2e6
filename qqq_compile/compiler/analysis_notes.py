"""Read-only questions about a lowered graph whose answers go into the report.

These sit beside :mod:`qqq_compile.graph` (layer 2) and only use its queries; the driver
asks them once per pipeline. (``float_weights_note`` used to live in ``api``, where the
blockwise path could only reach it by importing upwards.)
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph import TRANSPARENT, get_attr, info

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
    return "weights kept in float (no W4A8 rewrite for their ops): " + "; ".join(found) if found else None
