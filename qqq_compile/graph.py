"""Graph queries shared by all passes: linear sites, blocks, norms, a networkx view.

Passes ask these questions here instead of rediscovering patterns themselves, and no
question is answered with per-model code: everything is read off the exported graph
(op targets, ``get_attr`` weights and the ``nn_module_stack`` metadata).
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

if TYPE_CHECKING:
    from .formats import PackedW4

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


@dataclass
class LinearInfo:
    """Facts about one linear site, kept in ``node.meta["qqq"]`` by analysis passes."""

    fqn: str
    in_features: int
    out_features: int
    act_absmax: torch.Tensor | None = None  # [K] max |x| per input channel
    act_samples: int = 0
    hessian: torch.Tensor | None = None  # [K, K] fp32, 2/n * X^T X
    smooth_group: str | None = None
    smooth_scale_range: tuple[float, float] | None = None
    gptq: dict[str, Any] | None = None  # damping used, retries, loss
    packed: PackedW4 | None = None
    method: str | None = None  # "rtn" | "gptq"
    weight_sqnr_db: float | None = None
    lowered: bool = False
    skipped: str | None = None  # why it stays in float


def info(node: Node) -> LinearInfo | None:
    return node.meta.get("qqq")


# ----------------------------------------------------------------------------- params


def ensure_info(gm: GraphModule, site: LinearSite) -> LinearInfo:
    """The site's :class:`LinearInfo`, created (name and shape only) on first use."""
    li = info(site.node)
    if li is None:
        w = get_weight(gm, site)
        li = site.node.meta["qqq"] = LinearInfo(site.name, w.shape[1], w.shape[0])
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


def linear_sites(gm: GraphModule) -> list[LinearSite]:
    return [s for n in gm.graph.nodes if (s := match_linear(gm, n)) is not None]


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


# ----------------------------------------------------------------------------- blocks


@dataclass
class Block:
    """A repeated unit (a decoder layer): a contiguous run of nodes in graph order."""

    name: str  # e.g. "model.layers.3"
    nodes: list[Node] = field(default_factory=list)


@dataclass
class Partition:
    prefix: list[Node]
    blocks: list[Block]
    suffix: list[Node]


_INDEXED = re.compile(r"^(.*\.)?(\d+)$")


def block_prefix(gm: GraphModule) -> str | None:
    """The ModuleList path whose numbered children hold linears ('model.layers')."""
    counts: dict[str, set[str]] = defaultdict(set)
    # Linears, or nodes that were linears before lowering (they keep their LinearInfo).
    nodes = [s.node for s in linear_sites(gm)] + [n for n in gm.graph.nodes if isinstance(info(n), LinearInfo)]
    for node in nodes:
        for p in module_path(node):
            m = _INDEXED.match(p)
            if m and m.group(1):
                counts[m.group(1)[:-1]].add(m.group(2))
    candidates = [(len(p), p) for p, idx in counts.items() if len(idx) >= 1]
    return min(candidates)[1] if candidates else None


def partition(gm: GraphModule) -> Partition:
    """Split the graph, in node order, into prefix, decoder blocks and suffix.

    A node belongs to block ``i`` when ``<prefix>.i`` is on its module stack; nodes
    between blocks that belong to none are kept with the block before them (order is
    preserved, so every segment only reads values computed earlier).
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    prefix_path = block_prefix(gm)
    if prefix_path is None:
        return Partition(nodes, [], [])
    pat = re.compile(re.escape(prefix_path) + r"\.(\d+)$")

    def block_of(n: Node) -> str | None:
        for p in module_path(n):
            if pat.match(p):
                return p
        return None

    owners = [block_of(n) for n in nodes]
    idx = [i for i, o in enumerate(owners) if o is not None]
    first, last = idx[0], idx[-1]
    blocks: list[Block] = []
    for n, o in zip(nodes[first : last + 1], owners[first : last + 1], strict=True):
        if o is not None and (not blocks or blocks[-1].name != o):
            blocks.append(Block(o))
        blocks[-1].nodes.append(n)
    return Partition(nodes[:first], blocks, nodes[last + 1 :])


# ----------------------------------------------------------------------------- norms


@dataclass
class NormInfo:
    """A normalisation whose affine weight (and bias) can absorb a smoothing scale."""

    kind: str  # "rmsnorm" | "rmsnorm_plus_one" | "layernorm"
    output: Node
    weight: Node  # get_attr
    bias: Node | None = None
    eps: float | None = None
    input: Node | None = None


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


def _is_rsqrt_normalized(n: Any) -> tuple[Node | None, float | None]:
    """If ``n`` is ``x * rsqrt(mean(x^2) + eps)``, return (x, eps)."""
    n = through_transparent(n)
    if not (isinstance(n, Node) and n.op == "call_function" and n.target == aten.mul.Tensor):
        return None, None
    for a, b in (n.args, n.args[::-1]):
        if isinstance(b, Node) and b.target == aten.rsqrt.default:
            add = b.args[0]
            if isinstance(add, Node) and add.target in (aten.add.Tensor, aten.add.Scalar):
                eps = add.args[1] if isinstance(add.args[1], float) else None
                return through_transparent(a), eps
    return None, None


def find_norm(gm: GraphModule, out: Node) -> NormInfo | None:
    """Recognise RMSNorm (LLaMA/Qwen/Mistral), ``(1 + w)`` RMSNorm (Gemma) and LayerNorm."""
    out = through_transparent(out)
    if not isinstance(out, Node) or out.op != "call_function":
        return None
    ln = out
    if out.target is operator.getitem and out.args[1] == 0 and isinstance(out.args[0], Node):
        ln = out.args[0]  # native_layer_norm returns (out, mean, rstd)
    if (
        ln.target in (aten.layer_norm.default, aten.native_layer_norm.default)
        and len(ln.args) > 2
        and isinstance(ln.args[2], Node)
    ):
        w = ln.args[2]
        b = ln.args[3] if len(ln.args) > 3 and isinstance(ln.args[3], Node) else None
        if w.op == "get_attr" and (b is None or b.op == "get_attr"):
            eps = ln.args[4] if len(ln.args) > 4 else 1e-5
            return NormInfo("layernorm", out, w, b, eps, ln.args[0])
        return None
    if out.target != aten.mul.Tensor:
        return None
    for a, b in (out.args, out.args[::-1]):
        a_ = through_transparent(a)
        if isinstance(a_, Node) and a_.op == "get_attr" and get_attr(gm, a_.target).dim() == 1:
            x, eps = _is_rsqrt_normalized(b)
            if x is not None:
                return NormInfo("rmsnorm", out, a_, None, eps, x)
        # Gemma: normed * (1.0 + w)
        if isinstance(a_, Node) and a_.target in (aten.add.Tensor, aten.add.Scalar):
            terms = [through_transparent(t) for t in a_.args]
            ws = [t for t in terms if isinstance(t, Node) and t.op == "get_attr"]
            consts = [t for t in a_.args if isinstance(t, (int, float))]
            if len(ws) == 1 and consts in ([1.0], [1]):
                x, eps = _is_rsqrt_normalized(b)
                if x is not None:
                    return NormInfo("rmsnorm_plus_one", out, ws[0], None, eps, x)
    return None


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


@dataclass
class NormGroup:
    """A norm and the linear sites that read its output."""

    norm: NormInfo
    sites: list[LinearSite]
    other_users: list[Node]  # consumers that are not linears (folding is then unsafe)


def norm_groups(gm: GraphModule) -> list[NormGroup]:
    """Every norm that feeds at least one linear, with all of its consumers."""
    by_node = {s.node: s for s in linear_sites(gm)}
    groups: dict[Node, NormGroup] = {}
    for site in by_node.values():
        src = through_transparent(site.x)
        if src in groups:
            continue
        norm = find_norm(gm, src)
        if norm is None:
            continue
        users = consumers(norm.output)
        lin = [by_node[u] for u in users if u in by_node and through_transparent(by_node[u].x) is norm.output]
        others = [u for u in users if u not in by_node]
        groups[src] = NormGroup(norm, lin, others)
    return list(groups.values())


# ----------------------------------------------------------------------------- networkx


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """A DiGraph of the FX graph: nodes are fx node names with op/target/module attributes."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), module=module_fqn(n), node=n)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def downstream_linears(gm: GraphModule, start: Node, stop_at: set[Node] | None = None) -> list[LinearSite]:
    """Linear sites reachable from ``start`` without passing through another linear."""
    by_node = {s.node: s for s in linear_sites(gm)}
    seen, stack, found = set(), list(start.users), []
    while stack:
        n = stack.pop()
        if n in seen or (stop_at and n in stop_at):
            continue
        seen.add(n)
        if n in by_node:
            found.append(by_node[n])
            continue
        stack.extend(n.users)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found, key=lambda s: order[s.node])


# ----------------------------------------------------------------------------- linear → linear pairs


@dataclass
class LinearPair:
    """A producer linear whose output reaches ``consumers`` only through ops that are
    linear in it and keep its channels apart (views, permutes, ``* other``, SDPA's
    value input), so scaling the producer's output rows by ``1/s`` and the consumers'
    input columns by ``s`` leaves the float model unchanged (v→o with MHA, up→down).

    ``reason`` is None for a valid pair, else why the producer does not qualify.
    """

    producer: LinearSite
    consumers: list[LinearSite]
    path: list[Node] = field(default_factory=list)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def depends_on(n: Node, ancestor: Node) -> bool:
    """True when ``ancestor`` is among the transitive inputs of ``n`` (or is ``n``)."""
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m is ancestor:
            return True
        if m in seen:
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False


_SAME_LAYOUT = TRANSPARENT - {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SCALAR_LINEAR = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}


def _shape(n: Node) -> tuple | None:
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _static_suffix(shape: tuple, n: int) -> tuple[int, ...] | None:
    """Positions of the shortest suffix of static dims of ``shape`` whose product is ``n``."""
    prod, dims = 1, []
    for d in range(len(shape) - 1, -1, -1):
        if not isinstance(shape[d], int):
            return None
        prod *= shape[d]
        dims.insert(0, d)
        if prod == n:
            return tuple(dims)
        if prod > n:
            return None
    return None


def _track_channels(gm: GraphModule, prod: Node, n_out: int, by_node: dict[Node, LinearSite]):
    """Follow the producer's channels to the linears that read them.

    Returns (consumers, path, reason). The state tracked per value is the tuple of
    dims the producer's channel index is laid out along (major to minor).
    """
    found: list[LinearSite] = []
    path: list[Node] = []
    stack: list[tuple[Node, tuple[int, ...]]] = [(prod, (len(_shape(prod) or (0,)) - 1,))]
    done: set[Node] = set()
    while stack:
        r, chan = stack.pop()
        if r in done:
            continue
        done.add(r)
        shape_r = _shape(r)
        if shape_r is None:
            return found, path, f"{r.name} has no shape metadata"
        for u in r.users:
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u in by_node and by_node[u].x is r and by_node[u].weight is not r:
                if chan != (len(shape_r) - 1,) or shape_r[-1] != n_out:
                    return found, path, f"the channels reach {by_node[u].name} re-ordered or regrouped"
                if by_node[u] not in found:
                    found.append(by_node[u])
                continue
            out_shape = _shape(u)
            if u.op != "call_function" or out_shape is None:
                return found, path, f"the output flows into {u.name} ({u.op})"
            t, nd = u.target, len(out_shape)
            new: tuple[int, ...] | None
            if t in _SAME_LAYOUT:
                new = chan
            elif t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                if [str(d) for d in out_shape] == [str(d) for d in shape_r]:
                    new = chan  # a view to the same shape (HF re-views SDPA's output)
                elif chan != tuple(range(len(shape_r) - len(chan), len(shape_r))):
                    return found, path, f"{u.name} reshapes the channels after a permutation"
                else:
                    new = _static_suffix(out_shape, n_out)
            elif t == aten.permute.default:
                dims = [d % len(shape_r) for d in u.args[1]]
                new = tuple(dims.index(c) for c in chan)
            elif t == aten.transpose.int:
                a, b = (int(d) % len(shape_r) for d in u.args[1:3])
                new = tuple(b if c == a else a if c == b else c for c in chan)
            elif t == aten.unsqueeze.default:
                d = int(u.args[1]) % nd
                new = tuple(c + 1 if c >= d else c for c in chan)
            elif t == aten.slice.Tensor:
                dim = int(u.args[1]) % len(shape_r) if len(u.args) > 1 else 0
                full = (u.args[2] if len(u.args) > 2 else 0) in (0, None) and (
                    u.args[3] if len(u.args) > 3 else None
                ) in (None, 2**63 - 1)
                if dim in chan and not full:
                    return found, path, f"{u.name} slices the channels (e.g. rotary halves)"
                new = chan
            elif t in _SCALAR_LINEAR:
                if t in (aten.div.Tensor, aten.div.Scalar) and u.args[0] is not r:
                    return found, path, f"{u.name} divides by the output"
                others = [a for a in u.args if a is not r]
                if any(isinstance(a, Node) and depends_on(a, prod) for a in others) or list(u.args).count(r) > 1:
                    return found, path, f"{u.name} multiplies the output with a function of itself (a nonlinearity)"
                new = tuple(c + nd - len(shape_r) for c in chan)
            elif t == aten.scaled_dot_product_attention.default:
                if len(u.args) < 3 or u.args[2] is not r or u.args[0] is r or u.args[1] is r:
                    return found, path, f"the output is the query or key of {u.name}"
                if u.kwargs.get("enable_gqa"):
                    return found, path, f"{u.name} shares value heads between query heads (grouped-query attention)"
                if any(depends_on(a, prod) for a in u.args[:2]):
                    return found, path, f"the query or key of {u.name} depends on the output"
                q_shape = _shape(u.args[0])
                if len(shape_r) - 2 in chan or q_shape is None or q_shape[:-2] != shape_r[:-2]:
                    return found, path, f"{u.name} mixes the channels across heads or positions"
                new = chan
            elif t == aten.expand.default:
                return found, path, f"{u.name} repeats the channels (grouped-query attention shares value heads)"
            else:
                return found, path, f"the output goes through {t}, which is not linear in it"
            if new is None:
                return found, path, f"{u.name} regroups the channels"
            path.append(u)
            stack.append((u, new))
    if not found:
        return found, path, "the output reaches no linear"
    return found, path, None


def linear_pairs(gm: GraphModule, include_rejected: bool = False) -> list[LinearPair]:
    """Every producer linear whose output channels can be rescaled into the linears that
    read them (see :class:`LinearPair`). Output-channel counts must match the
    consumers' input columns: with grouped-query attention ``v_proj`` has fewer output
    channels than ``o_proj`` has inputs (and an ``expand`` repeats them), so v→o is
    rejected there. With ``include_rejected`` the refused producers come back too, each
    with its ``reason``."""
    sites = linear_sites(gm)
    by_node = {s.node: s for s in sites}
    out: list[LinearPair] = []
    for s in sites:
        n_out = get_weight(gm, s).shape[0]
        found, path, reason = _track_channels(gm, s.node, n_out, by_node)
        if reason is None:
            for c in found:
                k = get_weight(gm, c).shape[1]
                if k != n_out:
                    reason = f"{s.name} has {n_out} output channels but {c.name} reads {k} (shared heads)"
        if reason is None or include_rejected:
            out.append(LinearPair(s, found or downstream_linears(gm, s.node), path, reason))
    return out
