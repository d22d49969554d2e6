"""Capture a deep model by exporting a few of its decoder blocks and repeating one.

``torch.export`` of a decoder with dynamic batch and sequence spends most of its time in
symbolic-shape arithmetic, node by node: SmolLM2 (30 blocks) takes ~28 s, three of its blocks
~4 s. Every block past the first runs the same code on its own weights, so
:func:`qqq_compile.compiler.capture.capture` exports the model cut to :data:`EXPORTED_BLOCKS`
blocks (:func:`truncated`) and :func:`replicate` copies the graph of the last one for the rest,
with the right weights and ``nn_module_stack``.

It is used only when that is provably the same graph (otherwise the caller exports the whole
model):

* :func:`uniform_blocks`: every block has the same module tree, types, parameter and buffer
  shapes, no hooks, and equal plain attributes (a layer index aside; a per-layer
  ``attention_type`` or a config's mixed ``layer_types`` refuse);
* :func:`replicate`: the exported blocks 1 and 2 are the same graph, node for node: same ops
  and constants, block 2 reads block 1 where block 1 reads block 0, and its own weights where
  block 1 reads its own. So a constant that depends on the layer index shows up and refuses.
  Nothing after the blocks may read a block other than the last.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from qqq_compile.graph.blocks import BlockStack, module_block_stack, partition_nodes

EXPORTED_BLOCKS = 3  # block 2 is checked against block 1 (reading block 1 as 1 reads 0), then repeated
MIN_BLOCKS = 6  # below this the saving is small; the whole model is exported
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})


def replicable_stack(model: nn.Module) -> BlockStack | None:
    """The model's decoder stack when it is deep and uniform enough to capture by repetition."""
    stack = module_block_stack(model)
    if stack is None or len(stack.names) < MIN_BLOCKS:
        return None
    try:
        container = model.get_submodule(stack.path) if stack.path else model
    except AttributeError:
        return None
    if type(container) is not nn.ModuleList or len(container) != len(stack.names):
        return None
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(set(map(str, layer_types))) > 1:
        return None
    return stack if uniform_blocks(list(container)) else None


def uniform_blocks(blocks: list[nn.Module]) -> bool:
    """Whether every block has block 0's structure and plain attributes (see the module doc)."""
    first = _signature(blocks[0])
    return first is not None and all(_signature(b) == first for b in blocks[1:])


def _signature(block: nn.Module) -> list[Any] | None:
    sig: list[Any] = []
    for name, m in block.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
            return None
        attrs = []
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or k in _INDEX_ATTRS:
                continue
            attrs.append((k, _Eq(v)))
        params = [(k, tuple(p.shape), p.dtype) for k, p in m._parameters.items() if p is not None]
        buffers = [(k, tuple(b.shape), b.dtype) for k, b in m._buffers.items() if b is not None]
        sig.append((name, type(m), attrs, params, buffers))
    return sig


class _Eq:
    """Equality that never raises, for module attributes (configs, callables, tensors) and
    graph arguments (FX nodes by identity; ``1`` and ``1.0`` differ)."""

    def __init__(self, v: Any) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Eq):
            return NotImplemented
        if self.v is other.v:
            return True
        a, b = self.v, other.v
        if isinstance(a, Node) or isinstance(b, Node):
            return False  # not the same node
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # a plain tensor attribute
            return (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
                and (a.is_meta or bool(torch.equal(a, b)))
            )
        if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # partials compare by identity
            return _Eq((a.func, a.args, a.keywords)) == _Eq((b.func, b.args, b.keywords))
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(_Eq(x) == _Eq(y) for x, y in zip(a, b, strict=True))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(_Eq(a[k]) == _Eq(b[k]) for k in a)
        if type(a) is not type(b):
            return False
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - an ambiguous comparison counts as different
            return False


@contextlib.contextmanager
def truncated(model: nn.Module, stack: BlockStack, keep: int = EXPORTED_BLOCKS) -> Iterator[None]:
    """The model with only its first ``keep`` blocks (and a config that says so), restored after."""
    parent_path, _, attr = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attr)
    config = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    for key in ("num_hidden_layers", "layer_types"):
        if config is not None and getattr(config, key, None) is not None:
            saved[key] = getattr(config, key)
    try:
        setattr(parent, attr, nn.ModuleList(list(full)[:keep]))
        for key, v in saved.items():
            setattr(config, key, keep if key == "num_hidden_layers" else list(v)[:keep])
        yield
    finally:
        setattr(parent, attr, full)
        for key, v in saved.items():
            setattr(config, key, v)


def replicate(gm: GraphModule, model: nn.Module, stack: BlockStack) -> bool:
    """Extend ``gm``, the export of ``model`` cut to its first blocks, to all of ``stack``'s
    blocks by copying the last exported block. Returns False, leaving ``gm`` unchanged, when the
    exported blocks do not show it is the same graph (the caller then exports the whole model)."""
    graph = gm.graph
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    part = partition_nodes(nodes, BlockStack(stack.path, stack.names[:EXPORTED_BLOCKS]))
    if [b.name for b in part.blocks] != list(stack.names[:EXPORTED_BLOCKS]):
        return False
    b0, b1, b2 = (b.nodes for b in part.blocks)
    if not (len(b0) == len(b1) == len(b2)):
        return False
    after = {*b2, *part.suffix, *(n for n in graph.nodes if n.op == "output")}
    # A block is read only by itself and the next one; only the last is read after the blocks.
    for mine, readers in ((b0, {*b0, *b1}), (b1, {*b1, *b2}), (b2, after)):
        if any(u not in readers for n in mine for u in n.users):
            return False
    rename = _BlockRenamer(stack.path)
    shift = {n: b1[i] for i, n in enumerate(b0)} | {n: b2[i] for i, n in enumerate(b1)}

    def expected(a: Any) -> Any:  # what block 2 must read where block 1 reads ``a``
        if isinstance(a, Node):
            if a in shift:
                return shift[a]
            if a.op == "get_attr" and rename.block(a.target) is not None:
                return ("attr", rename(a.target, 1, 2))
        return a

    def actual(a: Any) -> Any:
        if isinstance(a, Node) and a.op == "get_attr" and rename.block(a.target) is not None:
            return ("attr", a.target)
        return a

    for t, c in zip(b1, b2, strict=True):
        if (t.op, t.target) != (c.op, c.target) or t.op != "call_function":
            return False
        exp = torch.fx.node.map_aggregate((t.args, t.kwargs), expected)
        act = torch.fx.node.map_aggregate((c.args, c.kwargs), actual)
        if _Eq(exp) != _Eq(act):
            return False
    _copy_blocks(gm, model, len(stack.names), b1, b2, part.suffix, rename)
    return True


class _BlockRenamer:
    """Renames block ``i`` to block ``j`` in qualified names, attribute targets and
    ``nn_module_stack`` keys (``model.layers.2.mlp`` -> ``model.layers.7.mlp``)."""

    def __init__(self, path: str) -> None:
        head = re.escape(path + ".") if path else ""
        self._pat = re.compile(rf"(?:^|(?<=[._\]]))({head})(\d+)(?=\.|$)")

    def block(self, name: str) -> int | None:
        m = self._pat.search(name)
        return int(m.group(2)) if m else None

    def __call__(self, name: str, src: int, dst: int) -> str:
        m = self._pat.search(name)
        if m is None or int(m.group(2)) != src:
            return name
        return name[: m.start(2)] + str(dst) + name[m.end(2) :]


def _copy_blocks(
    gm: GraphModule,
    model: nn.Module,
    n_blocks: int,
    b1: list[Node],
    b2: list[Node],
    suffix: list[Node],
    rename: _BlockRenamer,
) -> None:
    graph = gm.graph
    attrs: dict[str, Node] = {}
    first_attr = next(n for n in graph.nodes if n.op == "get_attr")  # block 2 reads its weights

    def attr_node(template: str, k: int) -> Node:
        target = rename(template, 2, k)
        if target not in attrs:
            _assign(gm, target, _model_tensor(model, target), like=template)
            with graph.inserting_before(first_attr):
                attrs[target] = graph.get_attr(target)
        return attrs[target]

    index = {n: i for i, n in enumerate(b2)}
    prev_index = {n: i for i, n in enumerate(b1)}
    prev, anchor = b2, b2[-1]
    for k in range(EXPORTED_BLOCKS, n_blocks):
        new: list[Node] = []

        def arg(a: Any, new: list[Node] = new, prev: list[Node] = prev, k: int = k) -> Any:
            if not isinstance(a, Node):
                return a
            if a in index:
                return new[index[a]]
            if a in prev_index:
                return prev[prev_index[a]]
            if a.op == "get_attr" and rename.block(a.target) == 2:
                return attr_node(a.target, k)
            return a

        for t in b2:
            args, kwargs = torch.fx.node.map_aggregate((t.args, t.kwargs), arg)
            with graph.inserting_after(anchor):
                n = graph.create_node(t.op, t.target, args, kwargs, type_expr=t.type)
            n.meta = dict(t.meta)
            if t.meta.get("nn_module_stack"):
                n.meta["nn_module_stack"] = {
                    rename(key, 2, k): (rename(v[0], 2, k), *v[1:]) for key, v in t.meta["nn_module_stack"].items()
                }
            new.append(n)
            anchor = n
        prev = new
    for user in [*suffix, *(n for n in graph.nodes if n.op == "output")]:
        for old in [a for a in user.all_input_nodes if a in index]:
            user.replace_input_with(old, prev[index[old]])
    graph.lint()
    gm.recompile()


def _model_tensor(model: nn.Module, target: str) -> torch.Tensor:
    mod_path, _, leaf = target.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    t = mod._parameters.get(leaf)
    if t is None:
        t = mod._buffers.get(leaf)
    if t is None:
        raise KeyError(target)
    return t


def _assign(gm: GraphModule, target: str, value: torch.Tensor, like: str) -> None:
    """Register ``value`` on ``gm`` at ``target`` as the export registered ``like`` (block 2's)."""
    like_path, _, like_leaf = like.rpartition(".")
    persistent = like_leaf not in gm.get_submodule(like_path)._non_persistent_buffers_set
    *path, leaf = target.split(".")
    mod: nn.Module = gm
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)
