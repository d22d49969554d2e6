"""One analysis per graph version: linear sites, norm groups, linear pairs, blocks, and a
networkx view for reachability and dominators.

Passes ask :func:`analysis` (or the module-level helpers built on it, such as
``linear_sites``) instead of re-matching patterns. The result is cached on the
``GraphModule`` and keyed by a fingerprint of the graph: node identities, targets,
arguments and weight shapes. A rewrite (a node added, erased or re-wired, a weight of a
new rank) changes the key, so a stale analysis is never returned even if nobody calls
:func:`invalidate`; the pipeline still invalidates after every rewriting pass so the
fingerprint is the safety net, not the mechanism. Callers treat what they get as
read-only: lists are copies, the site and norm objects are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.blocks import Block, BlockStack, Partition, block_stack, partition_nodes
from qqq_compile.graph.channels import LinearPair, find_linear_pairs
from qqq_compile.graph.norms import NormGroup, find_norm_groups
from qqq_compile.graph.sites import (
    ASSERT_OPS,
    LinearInfo,
    LinearSite,
    get_attr,
    info,
    match_linear,
    module_fqn,
)

_ATTR = "_qqq_analysis"


@dataclass
class BlockIO:
    """How a block connects to the rest of the graph (read off the dominator tree).

    * ``inputs``: values computed before the block that it reads (the residual stream,
      rotary tables, masks).
    * ``exit``: the node of the block through which every path from the block's first
      linear to the graph output passes (its post-dominator inside the block, normally
      the last residual add): the value that carries the block's result on.
    * ``outputs``: every value of the block read after it; more than ``[exit]`` means the
      block hands other values to later blocks (T5's position bias), which a stream-only
      view of the model (the blockwise fallback) cannot express.
    """

    inputs: list[Node] = field(default_factory=list)
    exit: Node | None = None
    outputs: list[Node] = field(default_factory=list)


class Analysis:
    """Facts about one version of a graph, computed on first use and then shared."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes: list[Node] = list(gm.graph.nodes)
        self.order: dict[Node, int] = {n: i for i, n in enumerate(self.nodes)}
        self.sites: list[LinearSite] = [s for n in self.nodes if (s := match_linear(gm, n)) is not None]
        self.by_node: dict[Node, LinearSite] = {s.node: s for s in self.sites}
        self._ancestors: dict[Node, set[Node]] = {}
        self._pairs: dict[bool, list[LinearPair]] = {}

    # -- patterns

    @cached_property
    def norm_groups(self) -> list[NormGroup]:
        return find_norm_groups(self.gm, self.sites)

    def linear_pairs(self, include_rejected: bool = False) -> list[LinearPair]:
        if include_rejected not in self._pairs:
            self._pairs[include_rejected] = find_linear_pairs(
                self.gm, self.sites, self.downstream_linears, self.depends_on, include_rejected
            )
        return self._pairs[include_rejected]

    def downstream_linears(self, start: Node, stop_at: set[Node] | None = None) -> list[LinearSite]:
        """Linear sites reachable from ``start`` without passing through another linear."""
        seen, stack, found = set(), list(start.users), []
        while stack:
            n = stack.pop()
            if n in seen or (stop_at and n in stop_at):
                continue
            seen.add(n)
            if n in self.by_node:
                found.append(self.by_node[n])
                continue
            stack.extend(n.users)
        return sorted(found, key=lambda s: self.order[s.node])

    # -- blocks

    @cached_property
    def block_stack(self) -> BlockStack | None:
        """The decoder-block container (:func:`graph.blocks.block_stack`), from the linear
        sites and the nodes that were linears before lowering (they keep their LinearInfo)."""
        named = [(s.name, get_attr(self.gm, s.weight.target).numel()) for s in self.sites]
        lowered = [n for n in self.nodes if n not in self.by_node and isinstance(info(n), LinearInfo)]
        named += [(module_fqn(n) or info(n).fqn, info(n).in_features * info(n).out_features) for n in lowered]
        return block_stack(named)

    @cached_property
    def _partition(self) -> Partition:
        body = [n for n in self.nodes if n.op not in ("placeholder", "output")]
        return partition_nodes(body, self.block_stack)

    @property
    def partition(self) -> Partition:
        """Prefix, blocks and suffix in graph order (a copy: callers may edit it)."""
        return self._partition.copy()

    # -- networkx: reachability and dominators

    @cached_property
    def nx(self) -> nx.DiGraph:
        """The data-flow DiGraph (nodes are fx Nodes; weights, metadata asserts and
        symbolic-shape arithmetic left out, since they carry no activation values)."""
        g = nx.DiGraph()
        for n in self.nodes:
            if _carries_data(n):
                g.add_node(n)
                g.add_edges_from((a, n) for a in n.all_input_nodes if _carries_data(a))
        return g

    def depends_on(self, n: Node, ancestor: Node) -> bool:
        """True when ``ancestor`` is ``n`` or among its transitive (data) inputs."""
        if n is ancestor:
            return True
        if n not in self.nx or ancestor not in self.nx:
            return False
        if n not in self._ancestors:
            self._ancestors[n] = nx.ancestors(self.nx, n)
        return ancestor in self._ancestors[n]

    @cached_property
    def post_dominators(self) -> dict[Node, Node]:
        """Immediate post-dominator of every node that reaches the graph output."""
        out = next((n for n in reversed(self.nodes) if n.op == "output"), None)
        if out is None or out not in self.nx:
            return {}
        return nx.immediate_dominators(self.nx.reverse(copy=False), out)

    def block_io(self, block: Block) -> BlockIO:
        """Inputs, exit and outputs of ``block`` (see :class:`BlockIO`)."""
        inside = set(block.nodes)
        inputs = {a: None for n in block.nodes for a in n.all_input_nodes if a not in inside and _carries_data(a)}
        outputs = [n for n in block.nodes if _carries_data(n) and any(u not in inside for u in n.users)]
        first = next((n for n in block.nodes if n in self.by_node or isinstance(info(n), LinearInfo)), None)
        exit_ = None
        pdom = self.post_dominators
        n = first
        while n is not None and n in pdom and pdom[n] is not n:
            if n in inside:
                exit_ = n
            n = pdom[n]
        return BlockIO(list(inputs), exit_, outputs)


def _carries_data(n: Node) -> bool:
    if n.op == "get_attr" or (n.op == "call_function" and n.target in ASSERT_OPS):
        return False
    return not (n.op == "call_function" and isinstance(n.meta.get("val"), (torch.SymInt, int)))


# ----------------------------------------------------------------------------- the cache


class _Slot:
    """Holds the cached analysis on the GraphModule; copies and pickles of the module
    start empty (the analysis refers to the original's nodes)."""

    def __init__(self, key: Any = None, value: Analysis | None = None):
        self.key, self.value = key, value

    def __deepcopy__(self, memo: dict) -> _Slot:
        return _Slot()

    def __reduce__(self) -> tuple[Callable[[], _Slot], tuple]:
        return _Slot, ()


def _freeze(a: Any) -> Any:
    if isinstance(a, Node):
        return ("node", id(a))
    if isinstance(a, (list, tuple)):
        return tuple(_freeze(x) for x in a)
    if isinstance(a, dict):
        return tuple((k, _freeze(v)) for k, v in a.items())
    if isinstance(a, slice):
        return ("slice", _freeze(a.start), _freeze(a.stop), _freeze(a.step))
    try:
        hash(a)
        return a
    except TypeError:
        return repr(a)


def graph_key(gm: GraphModule) -> int:
    """Fingerprint of the graph's structure: what every analysis is computed from."""
    parts = []
    for n in gm.graph.nodes:
        shape = None
        if n.op == "get_attr":
            t = get_attr(gm, n.target)
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
        parts.append((id(n), n.op, n.target, _freeze(n.args), _freeze(n.kwargs), shape))
    return hash((id(gm.graph), tuple(parts)))


def analysis(gm: GraphModule) -> Analysis:
    """The :class:`Analysis` of ``gm``'s current graph (computed once per graph version)."""
    key = graph_key(gm)
    slot = gm.__dict__.get(_ATTR)
    if isinstance(slot, _Slot) and slot.key == key and slot.value is not None:
        return slot.value
    value = Analysis(gm)
    gm.__dict__[_ATTR] = _Slot(key, value)
    return value


def invalidate(gm: GraphModule) -> None:
    """Drop the cached analysis of ``gm`` (the pipeline calls it after a rewriting pass)."""
    gm.__dict__.pop(_ATTR, None)


# ----------------------------------------------------------------------------- helpers


def linear_sites(gm: GraphModule) -> list[LinearSite]:
    """Every linear site, in graph order."""
    return list(analysis(gm).sites)


def norm_groups(gm: GraphModule) -> list[NormGroup]:
    """Every norm that feeds at least one linear, with all of its consumers."""
    return list(analysis(gm).norm_groups)


def linear_pairs(gm: GraphModule, include_rejected: bool = False) -> list[LinearPair]:
    """See :func:`graph.channels.find_linear_pairs`."""
    return list(analysis(gm).linear_pairs(include_rejected))


def downstream_linears(gm: GraphModule, start: Node, stop_at: set[Node] | None = None) -> list[LinearSite]:
    """Linear sites reachable from ``start`` without passing through another linear."""
    return analysis(gm).downstream_linears(start, stop_at)


def partition(gm: GraphModule) -> Partition:
    """Split the graph, in node order, into prefix, decoder blocks and suffix (the one
    block rule: :mod:`qqq_compile.graph.blocks`)."""
    return analysis(gm).partition


def block_prefix(gm: GraphModule) -> str | None:
    """The container path of the decoder blocks ('model.layers'), None without blocks."""
    stack = analysis(gm).block_stack
    return None if stack is None else stack.path


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """A DiGraph of the whole FX graph (every node, weights included), keyed by node name
    with op/target/module attributes: for users who want to query the graph themselves.
    The passes use :attr:`Analysis.nx` (fx Nodes, data edges only)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), module=module_fqn(n), node=n)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g
