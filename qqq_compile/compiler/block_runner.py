"""Block-by-block execution of a captured graph over calibration batches.

The graph is cut (by :func:`graph.partition`) into prefix, decoder blocks and suffix; a
graph without decoder blocks (an MLP, a module with no numbered layers) runs as one
block holding every node, so block-driven passes (smoothing, GPTQ) still see its linears.
:class:`BlockRunner` keeps, per calibration batch, only the values that later
segments still read (the residual stream, rotary tables, masks), so peak memory grows
with one block, not with the whole model. Passes iterate over blocks, run a block
with hooks and overrides (to collect statistics, try candidate scales, simulate
quantized weights) and then let the runner advance with the block's final form, so
the next block sees the outputs of the already-transformed block (as GPTQ does).

Weights kept on disk (:mod:`qqq_compile.compiler.residency`, used by streaming) are made resident for exactly the
segment being run: a block's weights are read when the runner reaches it and go back to
disk once the runner has advanced past it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from qqq_compile.compiler.residency import attr_targets, release_memory, resident
from qqq_compile.graph import Block, Partition, get_attr, partition

Env = dict[Node, Any]
Override = Callable[..., Any]
Hook = Callable[[Node, tuple, dict], None]


def _fetch(gm: GraphModule, n: Node) -> Any:
    return get_attr(gm, n.target)


def _map(gm: GraphModule, env: Env, a: Any) -> Any:
    if isinstance(a, Node):
        # Weights are fetched when read, never held in the env: the env then carries
        # only activations, and a block's weights can be streamed in and out.
        return _fetch(gm, a) if a.op == "get_attr" else env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_map(gm, env, x) for x in a)
    if isinstance(a, dict):
        return {k: _map(gm, env, v) for k, v in a.items()}
    return a


def run_node(gm: GraphModule, n: Node, env: Env, override: Override | None = None) -> Any:
    """Execute one FX node against ``env`` (values of its inputs)."""
    if n.op == "get_attr":
        return _fetch(gm, n)
    args, kwargs = _map(gm, env, n.args), _map(gm, env, n.kwargs)
    if override is not None:
        return override(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    raise RuntimeError(f"cannot execute node {n.name} of kind {n.op}")


def run_nodes(
    gm: GraphModule,
    nodes: Sequence[Node],
    env: Env,
    overrides: dict[Node, Override] | None = None,
    hooks: dict[Node, Hook] | None = None,
) -> Env:
    """Run ``nodes`` in order, writing results into ``env`` (which is returned)."""
    overrides = overrides or {}
    hooks = hooks or {}
    for n in nodes:
        if n.op == "get_attr":
            continue
        if n in hooks:
            hooks[n](n, _map(gm, env, n.args), _map(gm, env, n.kwargs))
        env[n] = run_node(gm, n, env, overrides.get(n))
    return env


def whole_graph(part: Partition) -> Partition:
    """A partition whose only block holds every node (for graphs without decoder blocks)."""
    return Partition([], [Block("graph", [*part.prefix, *[n for b in part.blocks for n in b.nodes], *part.suffix])], [])


def graph_device(gm: GraphModule) -> torch.device:
    """Where ``gm`` computes: the device of its first parameter, else of its first buffer
    (streamed weights answer with their store's device); torch's default device when it
    holds no tensor."""
    t = next(iter(gm.parameters()), None)
    if t is None:
        t = next(iter(gm.buffers()), None)
    return t.device if t is not None else torch.get_default_device()


def graph_env(gm: GraphModule, batch: dict[str | int, Any], device: torch.device | None = None) -> Env:
    """The placeholder values of one calibration batch: a dict keyed by graph input name
    (placeholder target or node name), or by position for positional inputs (``0`` is the
    first placeholder, as ``calib_batches`` writes them before the graph is known).
    ``device``: tensors (also inside lists and dicts) are moved there (a no-op for those
    already there), so token ids tokenized on the host feed a model on an accelerator."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: Env = {}
    for i, p in enumerate(placeholders):
        for key in (p.target, p.name, i):
            if key in batch:
                v = batch[key]
                env[p] = v if device is None else tree_map_only(torch.Tensor, lambda t: t.to(device), v)
                break
        else:
            have = sorted(map(str, batch))
            raise ValueError(
                f"calibration batch is missing input '{p.target}' (it has {have}; the graph's inputs are "
                f"{[q.target for q in placeholders]})"
            )
    return env


class BlockState:
    """What a pass sees for one block: the block and the live inputs of every batch."""

    def __init__(self, runner: BlockRunner, index: int, block: Block):
        self.runner, self.index, self.block = runner, index, block
        self.overrides: dict[Node, Override] = {}  # used when the runner advances

    def status(self, text: str) -> None:
        """Show what the pass is doing inside this block next to the progress bar."""
        bar = self.runner.bar
        if bar is not None:
            bar.set_postfix_str(f"{self.block.name}: {text}", refresh=True)

    @property
    def envs(self) -> list[Env]:
        return self.runner.envs

    def run(
        self,
        overrides: dict[Node, Override] | None = None,
        hooks: dict[Node, Hook] | None = None,
        nodes: Sequence[Node] | None = None,
        batches: Sequence[int] | None = None,
        outputs: Sequence[Node] = (),
    ) -> list[list[Any]]:
        """Run (part of) the block on (some) batches and return the ``outputs`` values.

        Each batch runs on a copy of its live env, so trying candidates never disturbs
        the state the next block starts from, and intermediates die with the copy.
        """
        nodes = self.block.nodes if nodes is None else nodes
        idx = range(len(self.envs)) if batches is None else batches
        out = []
        with torch.no_grad(), resident(self.runner.gm, attr_targets(nodes)):
            for i in idx:
                env = run_nodes(self.runner.gm, nodes, dict(self.envs[i]), overrides, hooks)
                out.append([env[o] for o in outputs])
        return out


class BlockRunner:
    """Runs calibration batches through a graph one block at a time."""

    def __init__(
        self,
        gm: GraphModule,
        batches: Sequence[dict[str, torch.Tensor]],
        *,
        progress: bool = True,
        desc: str = "blocks",
        part: Partition | None = None,
        device: torch.device | str | None = None,
    ):
        self.gm = gm
        # Each batch's tensors are moved once, here, to where the graph computes.
        self.device = torch.device(device) if device is not None else graph_device(gm)
        self.part = part or partition(gm)
        if not self.part.blocks:
            self.part = whole_graph(self.part)
        self.progress = progress
        self.desc = desc
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # The graph's outputs are never read back from the envs: a value only the output
        # node reads (the logits: tokens x vocab floats per batch) dies where it is made.
        self._last_use = {n: max((order[u] for u in n.users if u.op != "output"), default=-1) for n in gm.graph.nodes}
        self._order = order
        self.envs: list[Env] = [graph_env(gm, b, self.device) for b in batches]
        self.bar: tqdm | None = None  # the blocks' progress bar while blocks() runs

    def _advance(self, nodes: Sequence[Node], overrides: dict[Node, Override] | None = None) -> None:
        if not nodes:
            return
        end = self._order[nodes[-1]]
        with torch.no_grad(), resident(self.gm, attr_targets(nodes)):
            for env in self.envs:
                run_nodes(self.gm, nodes, env, overrides)
                for n in [n for n in env if self._last_use[n] <= end]:
                    del env[n]  # nothing later reads it: free it now

    def blocks(self, start: int = 0) -> Iterator[BlockState]:
        """Yield each block in order; after the caller is done with a block the runner
        executes it (with ``state.overrides``) to produce the next block's inputs."""
        self._advance(self.part.prefix)
        blocks = self.part.blocks
        # One line per pass, kept when done: the pass's name, block i/n, time per block, ETA.
        bar = tqdm(
            total=len(blocks),
            desc=self.desc,
            unit="block",
            disable=not self.progress,
            dynamic_ncols=True,
            initial=0,
        )
        self.bar = None if bar.disable else bar
        # The C++ extension's allocator, keeping freed tensors for the next batch.
        from qqq_compile.targets.w4a8.kernels.cpu import AllocationReuse, calib_reuse_bytes

        reuse = AllocationReuse(calib_reuse_bytes())
        try:
            for i, block in enumerate(blocks):
                reuse.start()  # once the C++ extension is loaded (a pass may load it in block 0)
                # Streamed weights stay resident while the caller works on the block and the
                # runner advances it; a weight the caller replaced is kept (on disk) after.
                with resident(self.gm, attr_targets(block.nodes)):
                    state = BlockState(self, i, block)
                    if i >= start:
                        yield state
                    self._advance(block.nodes, state.overrides)
                release_memory()  # the block's freed temporaries go back to the OS
                bar.update(1)
        finally:
            reuse.stop()
            bar.close()
            self.bar = None

    def suffix_state(self) -> BlockState:
        """The nodes after the last block (final norm, lm_head), as a pseudo-block."""
        return BlockState(self, len(self.part.blocks), Block("suffix", list(self.part.suffix)))
