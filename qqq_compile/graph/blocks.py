"""The one rule for "where are the decoder blocks".

A *block stack* is a container whose numbered children ``<path>.0 … <path>.n-1`` each hold
linear layers below them: ``model.layers`` (LLaMA), ``transformer.h`` (GPT-2),
``bert.encoder.layer``, ``vit.encoder.layer``. The rule reads only qualified linear names
and their sizes, so the same function answers for an exported graph (names from the
``nn_module_stack``) and for an ``nn.Module`` tree (the blockwise fallback, which has no
whole-model graph):

* a container counts when its children's indices run ``0..n-1`` and none of its children
  is itself a linear (a list of bare ``nn.Linear`` heads is not a stack of blocks);
* among those, the one holding the most linear weight wins (MoE expert lists and a
  decoder's cross-attention sub-lists hold less than the layer list around them); ties go
  to more children, then to the shorter path.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn
from torch.fx import Node

from qqq_compile.graph.sites import module_path


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

    def copy(self) -> Partition:
        """A copy whose lists callers may edit (the analysis keeps the original)."""
        return Partition(list(self.prefix), [Block(b.name, list(b.nodes)) for b in self.blocks], list(self.suffix))


@dataclass(frozen=True)
class BlockStack:
    """Where the blocks are: the container path ('' for the root) and the block names."""

    path: str
    names: tuple[str, ...]


def block_stack(linears: Iterable[tuple[str, int]]) -> BlockStack | None:
    """Apply the rule (module docstring) to ``(qualified linear name, weight numel)`` pairs."""
    weight: dict[str, int] = defaultdict(int)
    index: dict[str, set[int]] = defaultdict(set)
    leaves: set[str] = set()
    for name, numel in linears:
        leaves.add(name)
        parts = name.split(".")
        for i in range(len(parts) - 1):  # a block is a strict ancestor of the linear
            if parts[i].isdigit():
                path = ".".join(parts[:i])
                weight[path] += numel
                index[path].add(int(parts[i]))
    best: tuple[int, int, int, str] | None = None
    for path, idx in index.items():
        names = [f"{path}.{i}" if path else str(i) for i in sorted(idx)]
        if idx != set(range(len(idx))) or any(n in leaves for n in names):
            continue
        key = (weight[path], len(idx), -len(path), path)
        if best is None or key > best:
            best = key
    if best is None:
        return None
    path = best[3]
    return BlockStack(path, tuple(f"{path}.{i}" if path else str(i) for i in range(best[1])))


def _holds_weight_2d(m: nn.Module) -> bool:
    """A linear layer of the module tree: ``nn.Linear`` or a module with its own 2-D
    weight that is not an embedding (GPT-2's ``Conv1D``)."""
    if isinstance(m, nn.Linear):
        return True
    w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
    return w is not None and w.dim() == 2 and not isinstance(m, nn.Embedding)


def module_block_stack(model: nn.Module) -> BlockStack | None:
    """:func:`block_stack` of an ``nn.Module`` tree (its linear layers and their sizes)."""
    return block_stack((name, m.weight.numel()) for name, m in model.named_modules() if _holds_weight_2d(m))


def partition_nodes(nodes: list[Node], stack: BlockStack | None) -> Partition:
    """Split ``nodes`` (graph order, no placeholders/output) into prefix, blocks, suffix.

    A node belongs to block ``i`` when ``<path>.i`` is on its module stack; nodes between
    blocks that belong to none are kept with the block before them (order is preserved,
    so every segment only reads values computed earlier).
    """
    if stack is None:
        return Partition(list(nodes), [], [])
    pat = re.compile((re.escape(stack.path) + r"\." if stack.path else "") + r"\d+$")

    def block_of(n: Node) -> str | None:
        return next((p for p in module_path(n) if pat.match(p)), None)

    owners = [block_of(n) for n in nodes]
    idx = [i for i, o in enumerate(owners) if o is not None]
    if not idx:
        return Partition(list(nodes), [], [])
    first, last = idx[0], idx[-1]
    blocks: list[Block] = []
    for n, o in zip(nodes[first : last + 1], owners[first : last + 1], strict=True):
        if o is not None and (not blocks or blocks[-1].name != o):
            blocks.append(Block(o))
        blocks[-1].nodes.append(n)
    return Partition(list(nodes[:first]), blocks, list(nodes[last + 1 :]))
