"""Linear sites and the facts attached to them: annotations, weights, module names.

A *linear site* is a matmul against a constant weight in any spelling ``torch.export``
produces (``linear``, ``mm``, ``addmm``, ``matmul``, transposed weights as in GPT-2's
``Conv1D``). Everything is read off the exported graph (op targets, ``get_attr`` weights
and the ``nn_module_stack`` metadata), never from per-model code.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import LinearInfo, annotate, linear_info

aten = torch.ops.aten

# Ops that move or re-view data without changing values: pattern matching looks through them.
TRANSPARENT = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.alias.default,
    aten.dropout.default,
}
ASSERT_OPS = {aten._assert_tensor_metadata.default}


# ----------------------------------------------------------------------------- annotations
# The schema lives in qqq_compile.annotations; LinearInfo and info() are re-exported here
# because every pass reads them with the other graph queries.


def info(node: Node) -> LinearInfo | None:
    """The node's :class:`LinearInfo` (kept in its ``node.meta["qqq"]`` annotation)."""
    return linear_info(node)


# ----------------------------------------------------------------------------- params


def ensure_info(gm: GraphModule, site: LinearSite) -> LinearInfo:
    """The site's :class:`LinearInfo`, created (name and shape only) on first use."""
    li = info(site.node)
    if li is None:
        w = get_weight(gm, site)
        li = LinearInfo(site.name, w.shape[1], w.shape[0])
        annotate(site.node, linear=li)
    return li


def get_attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a weight with a *new* tensor (never in place: the user's model shares storage)."""
    *path, last = target.split(".")
    obj: Any = gm
    for part in path:
        obj = getattr(obj, part)
    old = getattr(obj, last, None)
    if isinstance(old, torch.nn.Parameter) or last in getattr(obj, "_parameters", {}):
        obj._parameters[last] = torch.nn.Parameter(value, requires_grad=False)
    elif last in getattr(obj, "_buffers", {}):
        obj._buffers[last] = value
    else:
        setattr(obj, last, value)


def attr_users(gm: GraphModule, target: str) -> list[Node]:
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]


# ----------------------------------------------------------------------------- linear sites


@dataclass
class LinearSite:
    """A matmul against a constant weight, in any of the spellings export produces.

    ``weight_t`` is True when the stored tensor is ``[K, N]`` (``x @ W``, GPT-2's Conv1D);
    :func:`get_weight` always returns ``[N, K]``.
    """

    node: Node
    x: Node
    weight: Node  # get_attr
    bias: Node | None
    weight_t: bool

    @property
    def name(self) -> str:
        return module_fqn(self.node) or re.sub(r"\.weight$", "", str(self.weight.target))

    def x_index(self) -> int:
        """Position of the input ``x`` among the node's arguments."""
        return next(i for i, a in enumerate(self.node.args) if a is self.x)

    def bias_value(self, args: tuple, kwargs: dict) -> Any:
        """The bias among the node's evaluated ``args``/``kwargs`` (None without one)."""
        if self.bias is None:
            return None
        for i, a in enumerate(self.node.args):
            if a is self.bias:
                return args[i]
        return kwargs.get("bias")


def _get_attr_through(n: Any) -> tuple[Node | None, bool]:
    """(get_attr node, transposed?) for a weight operand, looking through t/permute."""
    if not isinstance(n, Node):
        return None, False
    if n.op == "get_attr":
        return n, False
    if n.op == "call_function" and (
        n.target in (aten.t.default, aten.numpy_T.default)
        or (n.target == aten.permute.default and list(n.args[1]) in ([1, 0], [-1, -2]))
        or (n.target == aten.transpose.int and sorted(int(a) % 2 for a in n.args[1:3]) == [0, 1])
    ):
        inner, t = _get_attr_through(n.args[0])
        return inner, not t
    return None, False


def match_linear(gm: GraphModule, node: Node) -> LinearSite | None:
    """Recognise ``linear``, ``mm``, ``addmm`` and ``matmul`` against a 2-D constant weight."""
    if node.op != "call_function":
        return None
    site = None
    if node.target == aten.linear.default:
        w, t = _get_attr_through(node.args[1])
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if w is not None:
            site = LinearSite(node, node.args[0], w, b, t)
    elif node.target in (aten.mm.default, aten.matmul.default):
        w, t = _get_attr_through(node.args[1])
        if w is not None:
            site = LinearSite(node, node.args[0], w, None, not t)
    elif node.target == aten.addmm.default and not node.kwargs:
        w, t = _get_attr_through(node.args[2])
        if w is not None:
            site = LinearSite(node, node.args[1], w, node.args[0], not t)
    if site is None:
        return None
    if site.bias is not None and (not isinstance(site.bias, Node) or site.bias.op != "get_attr"):
        return None
    if get_attr(gm, site.weight.target).dim() != 2:
        return None
    return site


def get_weight(gm: GraphModule, site: LinearSite) -> torch.Tensor:
    w = get_attr(gm, site.weight.target)
    return (w.t() if site.weight_t else w).detach()


def set_weight(gm: GraphModule, site: LinearSite, w_nk: torch.Tensor) -> None:
    old = get_attr(gm, site.weight.target)
    new = (w_nk.t() if site.weight_t else w_nk).to(old.dtype).contiguous()
    set_attr(gm, site.weight.target, new)


def get_bias(gm: GraphModule, site: LinearSite) -> torch.Tensor | None:
    return None if site.bias is None else get_attr(gm, site.bias.target).detach()


def is_skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ----------------------------------------------------------------------------- module names


def static_size(d: Any) -> int | None:
    """The size of a dim as an int, or None when it is dynamic. A placeholder's fake value
    keeps the SymInt of a dim that export later specialised; that one counts as static."""
    if isinstance(d, int):
        return d
    value = d.node.maybe_as_int() if isinstance(d, torch.SymInt) else None
    return value if isinstance(value, int) else None


def module_fqn(node: Node) -> str:
    """Qualified name of the innermost module that produced ``node`` ('' if unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    fqn = list(stack.values())[-1][0]
    # export prefixes names of modules reached through attribute access with L['self']...
    return re.sub(r"^L\['self'\]\.?", "", fqn)


def module_path(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [re.sub(r"^L\['self'\]\.?", "", v[0]) for v in stack.values()]


# ----------------------------------------------------------------------------- views


def is_transparent(n: Any) -> bool:
    """View/copy ops that keep every value (including full-range slices like ``x[:, 0:]``)."""
    if not (isinstance(n, Node) and n.op == "call_function"):
        return False
    if n.target in TRANSPARENT:
        return True
    if n.target == aten.slice.Tensor:
        start = n.args[2] if len(n.args) > 2 else 0
        end = n.args[3] if len(n.args) > 3 else None
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))
    return False


def through_transparent(n: Any) -> Any:
    while is_transparent(n):
        n = n.args[0]
    return n


def consumers(n: Node) -> list[Node]:
    """Users of ``n``, looking through transparent ops and ignoring metadata asserts."""
    out: list[Node] = []
    for u in n.users:
        if u.op == "call_function" and u.target in ASSERT_OPS:
            continue
        if is_transparent(u) and u.args[0] is n:
            out.extend(consumers(u))
        else:
            out.append(u)
    return out
