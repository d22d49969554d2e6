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

import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate, node_annotation, set_node_annotation
from qqq_compile.compiler.hadamard import hadamard, hadamard_factors, paley_hadamard, rotation_matrix
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.graph import get_attr, get_bias, get_weight, set_attr, set_weight
from qqq_compile.graph.attention import attention_heads
from qqq_compile.graph.residual import NotRotatable, ResidualPlan, from_attention, residual_plan

aten = torch.ops.aten


def _fake_val(node: Node, target, args) -> None:
    """Set ``node.meta["val"]`` by running ``target`` on fake inputs (for re-export)."""
    vals = torch.fx.node.map_arg(args, lambda n: n.meta.get("val"))
    try:
        node.meta["val"] = target(*vals)
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
    With ``online_down_proj`` an ``x·H`` node (two ``aten.matmul`` against constant
    Kronecker factors) is inserted before each MLP output projection whose width admits
    a Hadamard, and ``H`` is folded into that projection's weight.

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
        q, kind = rotation_matrix(plan.hidden, self.seed)
        self._untie(gm, plan)
        with torch.no_grad():
            self._fold_norms(gm, plan)
            for target in {e.args[0].target for e in plan.embeddings}:
                e = get_attr(gm, target)
                set_attr(gm, target, (e.double() @ q).to(e.dtype))
            for sites in plan.readers.values():
                for s in sites:
                    w = get_weight(gm, s)
                    set_weight(gm, s, w.double() @ q)
                    annotate(s.node, rotate="reader")
            for s in plan.writers:
                w = get_weight(gm, s)
                set_weight(gm, s, q.T @ w.double())
                if s.bias is not None:
                    b = get_bias(gm, s)
                    set_attr(gm, s.bias.target, (q.T @ b.double()).to(b.dtype))
                annotate(s.node, rotate="writer")
        msg = (
            f"rotated the residual stream (width {plan.hidden}) with a {kind} matrix: {len(plan.embeddings)} "
            f"embedding(s), {sum(map(len, plan.readers.values()))} readers, {len(plan.writers)} writers"
        )
        if self.online_down_proj:
            msg += "; " + self._online(gm, plan)
        ctx.note(self.name, msg)
        if self.head_rotation:
            self._heads(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _heads_only(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        """The per-head rotation alone (the residual stream could not be rotated)."""
        if not self.head_rotation or not self._heads(gm, ctx):
            return PassResult(gm, False)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _heads(self, gm: GraphModule, ctx: CompileContext) -> int:
        """Fold a head-dim Hadamard into each attention's value rows and output columns;
        returns how many attentions were rotated."""
        found, why = attention_heads(gm)
        done, dims, skipped = 0, set(), []
        for a in found:
            hd, h = a.head_dim, hadamard(a.head_dim)
            if h is None:
                skipped.append(f"{a.value.name} (head dim {hd} admits no Hadamard)")
                continue
            with torch.no_grad():
                w = get_weight(gm, a.value).double()  # [kv_heads * hd, K]: Hᵀ on each head's rows
                set_weight(gm, a.value, (h.T @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape))
                if a.value.bias is not None:
                    b = get_bias(gm, a.value)
                    set_attr(gm, a.value.bias.target, (b.double().reshape(-1, hd) @ h).reshape(-1).to(b.dtype))
                for o in a.output:  # [N, heads * hd]: H on each head's columns
                    w = get_weight(gm, o).double()
                    set_weight(gm, o, (w.reshape(w.shape[0], -1, hd) @ h).reshape(w.shape))
            _mark(a.value.node, "head_value")
            for o in a.output:
                _mark(o.node, "head_output")
            done += 1
            dims.add(hd)
        if done:
            kinds = ", ".join(f"{d} (hadamard {'·'.join(map(str, hadamard_factors(d)))})" for d in sorted(dims))
            msg = f"rotated {done} attention(s) per head: head dim {kinds} in v_proj rows and o_proj columns"
            ctx.note(self.name, msg + (f"; not {', '.join(skipped)}" if skipped else ""))
        else:
            reasons = skipped + why or ["no scaled_dot_product_attention in the graph"]
            ctx.note(self.name, "head rotation skipped: " + "; ".join(reasons[:4]), level="warning")
        return done

    def _untie(self, gm: GraphModule, plan: ResidualPlan) -> None:
        """Give each linear that shares its weight with the embedding (or another
        linear) a weight attribute of its own, so each copy is rotated once."""
        emb = {e.args[0].target for e in plan.embeddings}
        sites = [s for ss in plan.readers.values() for s in ss] + plan.writers
        used = set(emb)
        for s in sites:
            t = s.weight.target
            if t not in used:
                used.add(t)
                continue
            name = "qqq_untied_" + re.sub(r"\W", "_", s.name) + "_weight"
            gm.register_parameter(name, torch.nn.Parameter(get_attr(gm, t).detach().clone(), requires_grad=False))
            with gm.graph.inserting_before(s.node):
                new = gm.graph.get_attr(name)
            new.meta = dict(s.weight.meta)
            for u in list(s.weight.users):
                if u is s.node or u in s.node.all_input_nodes:
                    u.replace_input_with(s.weight, new)
            s.weight = new

    def _fold_norms(self, gm: GraphModule, plan: ResidualPlan) -> None:
        done: set[str] = set()
        for norm in plan.norms:
            w = get_attr(gm, norm.weight.target).double()
            eff = 1 + w if norm.kind == "rmsnorm_plus_one" else w
            for s in plan.readers[norm.output]:
                ws = get_weight(gm, s)
                set_weight(gm, s, ws.double() * eff[None, :])
            done.add(norm.weight.target)
        for norm in plan.norms:
            if norm.weight.target in done:
                w = get_attr(gm, norm.weight.target)
                neutral = torch.zeros_like(w) if norm.kind == "rmsnorm_plus_one" else torch.ones_like(w)
                set_attr(gm, norm.weight.target, neutral)

    def _online(self, gm: GraphModule, plan: ResidualPlan) -> str:
        """Insert ``x·H`` before MLP writers and fold ``H`` into their weights."""
        g = gm.graph
        count, skipped = 0, []
        for s in plan.writers:
            k = get_weight(gm, s).shape[1]
            f = hadamard_factors(k)
            x_val = s.x.meta.get("val")
            if from_attention(s.x):
                continue
            if f is None or x_val is None:
                skipped.append(f"{s.name} (width {k} admits no Hadamard)" if f is None else s.name)
                continue
            b = f[-1] if f and f[-1] & (f[-1] - 1) == 0 else 1  # the Sylvester factor
            a = k // b
            mats = {}
            for size in (a, b):
                if size > 1 and size not in mats:
                    mats[size] = hadamard(size)
            # x H with H = A ⊗ B: view x as [..., a, b], then Aᵀ · X · B (cheaper than a k×k matmul)
            fake = x_val.fake_mode if hasattr(x_val, "fake_mode") else None
            with g.inserting_before(s.node):
                y = s.x
                if a > 1:
                    y = self._op(g, aten.unflatten.int, (y, -1, [a, b]))
                if b > 1:
                    y = self._op(g, aten.matmul.default, (y, self._const(gm, g, mats[b], fake)))
                if a > 1:
                    y = self._op(g, aten.matmul.default, (self._const(gm, g, mats[a].T.contiguous(), fake), y))
                    y = self._op(g, aten.flatten.using_ints, (y, -2, -1))
            annotate(y, online_hadamard=k)
            for n in [y, *list(y.all_input_nodes)]:
                n.meta.setdefault("nn_module_stack", _parent_stack(s.node))
            s.node.replace_input_with(s.x, y)
            one = torch.ones(1, 1, dtype=torch.float64)
            h = torch.kron(mats.get(a, one), mats.get(b, one))
            w = get_weight(gm, s)
            with torch.no_grad():
                set_weight(gm, s, w.double() @ h)
            annotate(s.node, rotate="writer+online_hadamard")
            count += 1
        out = f"online Hadamard before {count} MLP output projection(s)"
        return out + (f"; none for {', '.join(skipped)}" if skipped else "")

    def _op(self, g, target, args) -> Node:
        n = g.call_function(target, args)
        _fake_val(n, target, args)
        return n

    def _const(self, gm: GraphModule, g, m: torch.Tensor, fake) -> Node:
        """A constant matrix as ``view(flat_buffer, [n, n])``: a 2-D get_attr would be
        matched as a linear weight by ``graph.match_linear`` and quantized."""
        n = m.shape[0]
        name = f"qqq_hadamard_{n}" + ("_t" if not torch.equal(m, m.T) else "")
        flat = m.float().reshape(-1).contiguous()
        if not hasattr(gm, name):
            gm.register_buffer(name, flat)
        attr = g.get_attr(name)
        if fake is not None:
            attr.meta["val"] = fake.from_tensor(get_attr(gm, name))
        return self._op(g, aten.view.default, (attr, [n, n]))


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
