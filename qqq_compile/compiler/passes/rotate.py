"""``rotate``: orthogonal (Hadamard) rotation of the residual stream, QuaRot/SpinQuant
style, folded into the weights; optionally an online Hadamard before the MLP's output
projection and a per-head Hadamard on the attention values (R2).

With RMSNorm, ``RMSNorm(x Q) = RMSNorm(x) Q`` for orthogonal ``Q`` once the norm weight
is folded into the linears that read it. So the whole residual stream can live in the
rotated basis: embeddings ``E ← E Q``, residual readers ``W ← W Q``, residual writers
``W ← Qᵀ W`` (and ``b ← Qᵀ b``). Rotation spreads outlier channels over all channels,
which makes per-token int8 activations and int4 weights easier to quantize.

The graph analysis lives in :mod:`qqq_compile.graph.residual` (the stream) and
:mod:`qqq_compile.graph.attention` (the heads); the matrices in :mod:`qqq_compile.compiler.hadamard`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate, node_annotation, set_node_annotation
from qqq_compile.compiler.hadamard import (
    Rotation,
    describe,
    hadamard,
    hadamard_factors,
    paley_hadamard,
    rotation,
    rotation_matrix,
)
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.compiler.residency import LazyWeight, assign_attr, resident, reusing_freed_tensors
from qqq_compile.graph import LinearSite, get_attr, get_weight, partition, set_attr, set_weight
from qqq_compile.graph.attention import attention_heads
from qqq_compile.graph.residual import NotRotatable, ResidualPlan, from_attention, residual_plan

aten = torch.ops.aten


def _fake_val(node: Node, target, args, kwargs=None) -> None:
    """Set ``node.meta["val"]`` by running ``target`` on fake inputs (for re-export)."""
    vals = torch.fx.node.map_arg(args, lambda n: n.meta.get("val"))
    try:
        node.meta["val"] = target(*vals, **(kwargs or {}))
    except Exception:  # noqa: BLE001 - metadata only; a missing val merely costs a re-trace
        pass


@dataclass(frozen=True)
class RotateConfig(PassConfig):
    """``online_down_proj``: an online Hadamard before each MLP output projection;
    ``seed``: of the randomized Hadamard / random orthogonal matrix; ``head_rotation``:
    a head-dim Hadamard folded into each attention's value and output projections."""

    online_down_proj: bool = True
    seed: int = 0
    head_rotation: bool = False


@register_pass("rotate")
class Rotate(QQQPass):
    """Fold every RMSNorm weight into its readers, then rotate the residual stream by an
    orthonormal ``Q`` (randomized Hadamard when the hidden size allows, else seeded
    random orthogonal). Tied embeddings are untied (lm_head gets its own attribute).
    With ``online_down_proj`` an ``x·H`` computation (one ``mm``/``bmm`` per constant
    Kronecker factor of ``H``: 1536 = 12·128 is ``Aᵀ·X·B``) is inserted before each MLP
    output projection whose width admits a Hadamard, and ``H`` is folded into that
    projection's weight. Widths without one get a warning note naming what was done
    instead (a random orthogonal residual rotation; no online transform).

    The graph is edited first; the weight rewrites are queued and then run segment by
    segment (embeddings, each decoder block, the head), each segment's weights
    :func:`~qqq_compile.compiler.residency.resident` only while it is rewritten: with a
    streamed checkpoint the pass holds one block of float weights, not the model.

    With ``head_rotation`` (QuaRot/SpinQuant's R2) every value head is rotated by a
    head-dim Hadamard ``H``: ``v_proj``'s output rows (and bias) per KV-head block by
    ``Hᵀ``, ``o_proj``'s input columns per query-head block by ``H``. Attention mixes
    whole value vectors only, so this is exact under grouped-query attention too. The
    projections are found from each SDPA node (:func:`~qqq_compile.graph.attention.attention_heads`);
    attentions that do not match, or whose head dim admits no Hadamard, are left alone
    with a note. It also runs on models whose residual stream cannot be rotated.

    Preconditions: a float graph from ``capture``; RMSNorm models (LayerNorm models are
    skipped with a note). Position: first, before ``smooth``/``observe``/``gptq``.
    """

    name = "rotate"
    config_class = RotateConfig
    replay_mode = "rerun"  # deterministic given the graph and the config (seeded): load() runs it again

    def __init__(self, online_down_proj: bool = True, seed: int = 0, head_rotation: bool = False):
        super().__init__(RotateConfig(online_down_proj, seed, head_rotation))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        try:
            plan = residual_plan(gm)
        except NotRotatable as e:
            ctx.note(self.name, f"rotation skipped: {e}", level="warning")
            return self._heads_only(gm, ctx)
        # Built on the host (hadamard.py), moved once; the steps below move it again only for
        # a weight held elsewhere. A Hadamard is applied as its Kronecker factors, not as a
        # dense k x k matmul per row (Rotation.right).
        q = rotation(plan.hidden, self.seed).to(ctx.device)
        kind = q.kind
        work = _Rewrites(gm)
        self._untie(gm, plan)
        self._fold_norms(gm, plan, work)
        for target, node in {e.args[0].target: e for e in plan.embeddings}.items():
            work.attr(node, target, q.right, rows=True)
        for sites in plan.readers.values():
            for s in sites:
                work.site(s, q.right, rows=True)
                annotate(s.node, rotate="reader")
        for s in plan.writers:
            work.site(s, q.left_t)
            if s.bias is not None:
                work.attr(s.node, s.bias.target, q.left_t)
            annotate(s.node, rotate="writer")
        msg = (
            f"rotated the residual stream (width {plan.hidden}) with a {kind} matrix: {len(plan.embeddings)} "
            f"embedding(s), {sum(map(len, plan.readers.values()))} readers, {len(plan.writers)} writers"
        )
        if kind == "random orthogonal":
            ctx.note(
                self.name,
                f"residual width {plan.hidden} admits no Hadamard that qqq_compile builds: the residual stream is "
                f"rotated by a seeded random orthogonal matrix instead (dense, seed {self.seed})",
                level="warning",
            )
        if self.online_down_proj:
            msg += "; " + self._online(gm, plan, ctx, work)
        ctx.note(self.name, msg)
        if self.head_rotation:
            self._heads(gm, ctx, work)
        work.run()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _heads_only(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        """The per-head rotation alone (the residual stream could not be rotated)."""
        work = _Rewrites(gm)
        if not self.head_rotation or not self._heads(gm, ctx, work):
            return PassResult(gm, False)
        work.run()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _heads(self, gm: GraphModule, ctx: CompileContext, work: _Rewrites) -> int:
        """Fold a head-dim Hadamard into each attention's value rows and output columns;
        returns how many attentions were rotated."""
        found, why = attention_heads(gm)
        done, dims, skipped = 0, set(), []
        for a in found:
            hd, h = a.head_dim, hadamard(a.head_dim)
            if h is None:
                skipped.append(f"{a.value.name} (head dim {hd} admits no Hadamard)")
                continue
            # v_proj [kv_heads * hd, K]: Hᵀ on each head's rows; o_proj [N, heads * hd]: H on each head's columns
            h = h.to(ctx.device)  # built on the host (hadamard.py)
            work.site(a.value, lambda w, h=h, hd=hd: (_on(h, w).T @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape))
            if a.value.bias is not None:
                work.attr(
                    a.value.node, a.value.bias.target, lambda b, h=h, hd=hd: (b.reshape(-1, hd) @ _on(h, b)).reshape(-1)
                )
            for o in a.output:
                work.site(
                    o, lambda w, h=h, hd=hd: (w.reshape(w.shape[0], -1, hd) @ _on(h, w)).reshape(w.shape), rows=True
                )
            _mark(a.value.node, "head_value")
            for o in a.output:
                _mark(o.node, "head_output")
            done += 1
            dims.add(hd)
        if done:
            kinds = ", ".join(f"{d} ({describe(d)})" for d in sorted(dims))
            msg = f"rotated {done} attention(s) per head: head dim {kinds} in v_proj rows and o_proj columns"
            ctx.note(self.name, msg + (f"; not {', '.join(skipped)}" if skipped else ""))
        else:
            reasons = skipped + why or ["no scaled_dot_product_attention in the graph"]
            ctx.note(self.name, "head rotation skipped: " + "; ".join(reasons[:4]), level="warning")
        return done

    def _untie(self, gm: GraphModule, plan: ResidualPlan) -> None:
        """Give each linear that shares its weight with the embedding (or another
        linear) a weight attribute of its own, so each copy is rotated once. A streamed
        weight gets a second lazy handle on the same data (nothing is read)."""
        emb = {e.args[0].target for e in plan.embeddings}
        sites = [s for ss in plan.readers.values() for s in ss] + plan.writers
        used = set(emb)
        for s in sites:
            t = s.weight.target
            if t not in used:
                used.add(t)
                continue
            name = "qqq_untied_" + re.sub(r"\W", "_", s.name) + "_weight"
            src = get_attr(gm, t).detach()
            lazy = isinstance(src, LazyWeight)
            copy = torch.empty(0, device=src.device) if lazy else src.clone()
            gm.register_parameter(name, torch.nn.Parameter(copy, requires_grad=False))
            with gm.graph.inserting_before(s.node):
                new = gm.graph.get_attr(name)
            if lazy:  # the slot takes the lazy tensor itself (a Parameter would wrap its placeholder data)
                assign_attr(gm, name, src)
            new.meta = dict(s.weight.meta)
            for u in list(s.weight.users):
                if u is s.node or u in s.node.all_input_nodes:
                    u.replace_input_with(s.weight, new)
            s.weight = new

    def _fold_norms(self, gm: GraphModule, plan: ResidualPlan, work: _Rewrites) -> None:
        """Queue each norm weight's fold into its readers, then make the norms neutral."""
        with torch.no_grad():
            for norm in plan.norms:
                w = get_attr(gm, norm.weight.target).double()  # a norm weight is small: read it now
                eff = 1 + w if norm.kind == "rmsnorm_plus_one" else w
                for s in plan.readers[norm.output]:
                    work.site(s, lambda ws, eff=eff: ws * eff[None, :], rows=True)
            for target, kind in {n.weight.target: n.kind for n in plan.norms}.items():
                w = get_attr(gm, target)
                fill = torch.zeros if kind == "rmsnorm_plus_one" else torch.ones
                set_attr(gm, target, fill(w.shape, dtype=w.dtype, device=w.device))

    def _online(self, gm: GraphModule, plan: ResidualPlan, ctx: CompileContext, work: _Rewrites) -> str:
        """Insert ``x·H`` before MLP writers and fold ``H`` into their weights."""
        count, skipped, no_hadamard, widths = 0, [], [], {}
        for s in plan.writers:
            if from_attention(s.x):
                continue
            k = get_weight(gm, s).shape[1]
            if s.x.meta.get("val") is None:
                skipped.append(s.name)
                continue
            if k not in widths:
                f = hadamard_factors(k)
                widths[k] = None if f is None else (f or [1], [hadamard(n) for n in f or [1]], Rotation.hadamard(k))
            if widths[k] is None:
                no_hadamard.append(f"{s.name} (width {k})")
                continue
            factors, mats, fold = widths[k]
            y = self._kron_chain(gm, s, factors, mats)
            annotate(y, online_hadamard=k)
            for n in [y, *list(y.all_input_nodes)]:
                n.meta.setdefault("nn_module_stack", _parent_stack(s.node))
            s.node.replace_input_with(s.x, y)
            work.site(s, fold.right, rows=True)  # the same H as the chain, as its factors
            annotate(s.node, rotate="writer+online_hadamard")
            count += 1
        out = f"online Hadamard before {count} MLP output projection(s)"
        done = [k for k, v in widths.items() if v is not None]
        if done:
            out += " (" + ", ".join(f"width {k}: {describe(k)}" for k in done) + ")"
        if no_hadamard:
            bad = sorted(k for k, v in widths.items() if v is None)
            ctx.note(
                self.name,
                f"MLP width {', '.join(map(str, bad))} admits no Hadamard that qqq_compile builds: no online "
                f"transform before {', '.join(no_hadamard)}; their inputs are quantized unrotated",
                level="warning",
            )
        skipped += no_hadamard
        return out + (f"; none for {', '.join(skipped)}" if skipped else "")

    def _kron_chain(self, gm: GraphModule, at: LinearSite, factors: list[int], mats: list[torch.Tensor]) -> Node:
        """Nodes computing ``x·(F1 ⊗ … ⊗ Fr)``, ``x`` the input of ``at``, one factor at
        a time on ``x`` viewed as rows: the last as one ``mm`` ``X·Fr`` over ``[rows·k/fr, fr]``,
        each other one as one ``bmm`` ``Fiᵀ·X`` over ``[rows·pre, fi, post]`` against ``Fiᵀ``
        broadcast over the batch (a stride-0 expand). Every view is of a contiguous tensor,
        so no transposed copy of ``x`` is made (half the time of the transpose/clone chain
        on 8192 rows of 1536), and no op broadcasts over a dynamic length (re-exporting the
        decode step guards on ``length != 1`` when ``matmul`` does). The cost is
        ``k·(f1 + … + fr)`` per token, not ``k²``."""
        g, x = gm.graph, at.x
        val = x.meta["val"]
        fake = val.fake_mode if hasattr(val, "fake_mode") else None
        k = math.prod(factors)
        with g.inserting_before(at.node):
            shape = val.shape[:-1]
            lead = [d if isinstance(d, int) else self._op(g, aten.sym_size.int, (x, i)) for i, d in enumerate(shape)]
            y = self._op(g, aten.reshape.default, (x, [-1, factors[-1]]))
            y = self._op(g, aten.mm.default, (y, self._const(gm, g, mats[-1], fake, val.device)))
            for i in reversed(range(len(factors) - 1)):
                f, post = factors[i], math.prod(factors[i + 1 :])
                y = self._op(g, aten.view.default, (y, [-1, f, post]))
                rows = self._op(g, aten.sym_size.int, (y, 0))
                ft = self._op(g, aten.t.default, (self._const(gm, g, mats[i], fake, val.device),))
                ft = self._op(g, aten.expand.default, (ft, [rows, f, f]))
                y = self._op(g, aten.bmm.default, (ft, y))
            y = self._op(g, aten.view.default, (y, [*lead, k]))
        return y

    def _op(self, g, target, args, kwargs=None) -> Node:
        n = g.call_function(target, args, kwargs or {})
        _fake_val(n, target, args, kwargs or {})
        return n

    def _const(self, gm: GraphModule, g, m: torch.Tensor, fake, device: torch.device) -> Node:
        """A constant matrix as ``view(flat_buffer, [n, n])``: a 2-D get_attr would be
        matched as a linear weight by ``graph.match_linear`` and quantized."""
        n = m.shape[0]
        name = f"qqq_hadamard_{n}" + ("_t" if not torch.equal(m, m.T) else "")
        flat = m.float().reshape(-1).contiguous().to(device)  # next to the activation it multiplies
        if not hasattr(gm, name):
            gm.register_buffer(name, flat)
        attr = g.get_attr(name)
        if fake is not None:
            attr.meta["val"] = fake.from_tensor(get_attr(gm, name))
        return self._op(g, aten.view.default, (attr, [n, n]))


def _on(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``m`` on ``like``'s device (itself when it already is there)."""
    return m.to(like.device)


#: A row-wise step on a tensor above this many elements (32 MiB in float64) runs in
#: chunks of rows: an embedding's float64 copy and product would be 4x its size at once.
CHUNK_ELEMENTS = 1 << 22


class _Rewrites:
    """Weight rewrites queued in order, then run segment by segment (prefix, each
    decoder block, suffix), each segment's weights resident at once (:func:`resident`):
    with streamed weights only one segment's float weights are in memory, and each
    rewritten weight goes back to disk when its segment is done. Each step computes in
    float64 and stores in the weight's dtype, as the steps did when they ran in place;
    ``rows=True`` marks a step whose output rows depend only on the same input rows."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        part = partition(gm)
        self._segment = {n: "" for n in part.prefix} | {n: "~" for n in part.suffix}
        for b in part.blocks:
            self._segment.update({n: b.name for n in b.nodes})
        self._jobs: dict[str | None, list[tuple[str, Callable[[], None]]]] = {}

    def site(self, s: LinearSite, fn: Callable[[torch.Tensor], torch.Tensor], rows: bool = False) -> None:
        """Queue ``W ← fn(W)`` on the site's weight in ``[N, K]`` orientation."""

        def job() -> None:
            w = get_weight(self.gm, s)
            set_weight(self.gm, s, _apply(fn, w, w.dtype, rows))

        self._add(s.node, s.weight.target, job)

    def attr(self, node: Node, target: str, fn: Callable[[torch.Tensor], torch.Tensor], rows: bool = False) -> None:
        """Queue ``t ← fn(t)`` on the attribute ``target`` (read by ``node``)."""

        def job() -> None:
            t = get_attr(self.gm, target)
            set_attr(self.gm, target, _apply(fn, t, t.dtype, rows))

        self._add(node, target, job)

    def _add(self, node: Node, target: str, job: Callable[[], None]) -> None:
        self._jobs.setdefault(self._segment.get(node), []).append((target, job))

    def run(self) -> None:
        # The float64 chunks come in a few sizes, thousands of times: reuse their memory.
        with torch.no_grad(), reusing_freed_tensors():
            for jobs in self._jobs.values():
                with resident(self.gm, {t for t, _ in jobs}):
                    for _, job in jobs:
                        job()
        self._jobs.clear()


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, dtype: torch.dtype, rows: bool) -> torch.Tensor:
    """``fn(t)`` in float64, stored as ``dtype``; row-wise steps on large tensors run in
    chunks of rows, so only a chunk is ever in float64."""
    if not rows or t.dim() != 2 or t.numel() <= CHUNK_ELEMENTS:
        return fn(t.double()).to(dtype)
    # A power of two rows per chunk: BLAS then computes every row with the kernel the
    # whole matrix would use (odd chunk heights moved rows onto its tail kernel, whose
    # different summation order changed 54 of SmolLM2's lm_head entries by an ulp).
    step = 1 << max(6, (CHUNK_ELEMENTS // t.shape[1]).bit_length() - 1)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    for i in range(0, t.shape[0], step):
        out[i : i + step] = fn(t[i : i + step].double())
    return out


def _mark(node: Node, role: str) -> None:
    """Add ``role`` to the node's rotation annotation (``reader`` → ``reader+head_value``)."""
    ann = node_annotation(node)
    ann.rotate = f"{ann.rotate}+{role}" if ann.rotate else role
    set_node_annotation(node, ann)


def _parent_stack(n: Node) -> dict:
    stack = dict(n.meta.get("nn_module_stack") or {})
    if stack:
        stack.pop(list(stack)[-1])
    return stack


__all__ = [
    "NotRotatable",
    "ResidualPlan",
    "Rotate",
    "hadamard",
    "hadamard_factors",
    "paley_hadamard",
    "residual_plan",
    "rotation_matrix",
]
