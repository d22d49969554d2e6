"""``rotate``: orthogonal (Hadamard) rotation of the residual stream, QuaRot/SpinQuant
style, folded into the weights; optionally an online Hadamard before the MLP's output
projection.

With RMSNorm, ``RMSNorm(x Q) = RMSNorm(x) Q`` for orthogonal ``Q`` once the norm weight
is folded into the linears that read it. So the whole residual stream can live in the
rotated basis: embeddings ``E ← E Q``, residual readers ``W ← W Q``, residual writers
``W ← Qᵀ W`` (and ``b ← Qᵀ b``). Rotation spreads outlier channels over all channels,
which makes per-token int8 activations and int4 weights easier to quantize.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import reduce

import torch
from torch.fx import GraphModule, Node

from ..annotations import annotate
from ..graph import (
    ASSERT_OPS,
    TRANSPARENT,
    LinearSite,
    NormInfo,
    consumers,
    find_norm,
    get_attr,
    get_bias,
    get_weight,
    linear_sites,
    set_attr,
    set_weight,
    through_transparent,
)
from ..pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass

aten = torch.ops.aten

# ----------------------------------------------------------------------------- matrices


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(q: int) -> torch.Tensor:
    """Paley construction I: a ±1 Hadamard matrix of order ``q + 1`` for a prime
    ``q ≡ 3 (mod 4)`` (q = 11 gives H12, q = 19 gives H20)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley construction I needs a prime q ≡ 3 mod 4, got {q}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix, antisymmetric here
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_BASES = {12: 11, 20: 19}  # order → Paley prime


def hadamard_factors(n: int) -> list[int] | None:
    """Orders whose Kronecker product is an ``n``×``n`` Hadamard matrix: any number of
    12s and 20s (Paley) and one power of two (Sylvester), e.g. 576 → [12, 12, 4]."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return [n] if n > 1 else []
    for base in _BASES:
        if n % base == 0 and (rest := hadamard_factors(n // base)) is not None:
            return [base, *rest]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal ``n``×``n`` Hadamard matrix (float64), or None if none is built."""
    f = hadamard_factors(n)
    if f is None:
        return None
    f = f or [1]
    mats = [paley_hadamard(_BASES[k]) if k in _BASES else _sylvester(k) for k in f]
    return reduce(torch.kron, mats) / math.sqrt(n)


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Orthonormal ``Q`` (float64): a Hadamard with seeded random signs on its rows when
    one of order ``n`` can be built, else a seeded random orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * h, "hadamard " + "·".join(map(str, hadamard_factors(n)))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal"


# ----------------------------------------------------------------------------- analysis


class NotRotatable(Exception):
    """The graph does not have the shape rotation needs (the message says why)."""


@dataclass
class ResidualPlan:
    """The residual stream as read off the graph."""

    embeddings: list[Node] = field(default_factory=list)  # aten.embedding nodes
    norms: list[NormInfo] = field(default_factory=list)
    readers: dict[Node, list[LinearSite]] = field(default_factory=dict)  # norm output → linears
    writers: list[LinearSite] = field(default_factory=list)
    hidden: int = 0


_STREAM_VIEWS = TRANSPARENT | {aten.slice.Tensor}


def _numel1(a) -> bool:
    if isinstance(a, (int, float)):
        return True
    v = a.meta.get("val") if isinstance(a, Node) else None
    return isinstance(v, torch.Tensor) and v.numel() == 1


def _keeps_last_dim(n: Node) -> bool:
    """A view/slice that leaves the hidden (last) dim alone."""
    if n.target == aten.slice.Tensor:
        nd = len(n.args[0].meta["val"].shape)
        return int(n.args[1] if len(n.args) > 1 else 0) % nd != nd - 1
    if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        a, b = n.args[0].meta.get("val"), n.meta.get("val")
        return a is not None and b is not None and str(a.shape[-1]) == str(b.shape[-1])
    return True


def _norm_index(gm: GraphModule) -> dict[Node, list[tuple[NormInfo, set[Node]]]]:
    """Norm input node → [(norm, nodes of the norm computation reading it)]."""
    out: dict[Node, list[tuple[NormInfo, set[Node]]]] = {}
    seen: set[Node] = set()
    for n in gm.graph.nodes:
        norm = find_norm(gm, n) if n.op == "call_function" else None
        if norm is None or norm.output in seen or norm.input is None:
            continue
        seen.add(norm.output)
        inner, stack = set(), [norm.output]
        while stack:  # the nodes between the input and the output
            m = stack.pop()
            if m in inner or m is norm.input:
                continue
            inner.add(m)
            stack.extend(m.all_input_nodes)
        out.setdefault(norm.input, []).append((norm, inner))
    return out


def residual_plan(gm: GraphModule) -> ResidualPlan:
    """Follow the residual stream from the token embedding; raise :class:`NotRotatable`
    when anything other than RMSNorms reads it or anything but linears writes it."""
    # Copies: the plan's sites are re-pointed at untied weights later, and the graph
    # analysis shares its own site objects with every other caller.
    sites = {s.node: replace(s) for s in linear_sites(gm)}
    plan = ResidualPlan()
    plan.embeddings = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target == aten.embedding.default
        and isinstance(n.args[0], Node)
        and n.args[0].op == "get_attr"
    ]
    if not plan.embeddings:
        raise NotRotatable("no token embedding (aten.embedding of a weight) starts a residual stream")
    norms = _norm_index(gm)
    stream, stack = set(), list(plan.embeddings)
    found: dict[Node, NormInfo] = {}
    while stack:
        r = stack.pop()
        if r in stream:
            continue
        stream.add(r)
        for u in list(r.users):
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u.op == "output":
                raise NotRotatable("the residual stream is a graph output (it would come out rotated)")
            # A view of the stream stays on it even when a norm also reads it (OPT views
            # the residual once, then both its LayerNorm and the next add read the view).
            inner = [nm for nm, nodes in norms.get(r, []) + norms.get(through_transparent(r), []) if u in nodes]
            if u.target in _STREAM_VIEWS and _keeps_last_dim(u):
                stack.append(u)
            elif inner:
                found[inner[0].output] = inner[0]
            elif u.target in (aten.mul.Tensor, aten.mul.Scalar) and all(a is r or _numel1(a) for a in u.args):
                stack.append(u)  # Gemma's embedding scale
            elif u.target == aten.add.Tensor and len(u.args) == 2 and all(isinstance(a, Node) for a in u.args):
                other = u.args[1] if u.args[0] is r else u.args[0]
                src = through_transparent(other)
                if other in stream or src in stream or src in plan.embeddings:  # e.g. + position embedding
                    stack.append(u)
                elif src in sites and consumers(src) == [u]:
                    plan.writers.append(sites[src])
                    stack.append(u)
                else:
                    raise NotRotatable(
                        f"{u.name} adds {other.name} to the residual stream, which is not a linear output"
                    )
            else:
                raise NotRotatable(f"{u.name} ({u.target}) reads the residual stream and is not rotation-invariant")
    for norm in found.values():
        if norm.kind == "layernorm":
            raise NotRotatable(
                "the residual stream is read by LayerNorm, which subtracts the mean: that is not "
                "rotation-invariant (fold the centering first, as SliceGPT does)"
            )
        readers = _readers(norm, sites)
        plan.readers[norm.output] = readers
        plan.norms.append(norm)
    hidden = {get_attr(gm, e.args[0].target).shape[1] for e in plan.embeddings}
    if len(hidden) != 1:
        raise NotRotatable(f"embeddings of different widths {sorted(hidden)} feed the residual stream")
    plan.hidden = hidden.pop()
    plan.writers = list({w.node: w for w in plan.writers}.values())
    return plan


def _readers(norm: NormInfo, sites: dict[Node, LinearSite]) -> list[LinearSite]:
    out, stack = [], [norm.output]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in ASSERT_OPS:
                continue
            if u in sites and sites[u].x is n:
                out.append(sites[u])
            elif u.target in _STREAM_VIEWS and _keeps_last_dim(u):
                stack.append(u)
            else:
                raise NotRotatable(f"the output of a norm feeds {u.name} ({u.target}), which is not a linear")
    return out


def _from_attention(x: Node) -> bool:
    """True when ``x`` comes (through views/permutes) from an attention product."""
    seen, stack = set(), [x]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in (aten.scaled_dot_product_attention.default, aten.bmm.default, aten.matmul.default):
            return True
        if n.target in TRANSPARENT or n.target in (aten.permute.default, aten.transpose.int):
            stack.append(n.args[0])
    return False


# ----------------------------------------------------------------------------- the pass


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
    ``seed``: of the randomized Hadamard / random orthogonal matrix."""

    online_down_proj: bool = True
    seed: int = 0


@register_pass("rotate")
class Rotate(QQQPass):
    """Fold every RMSNorm weight into its readers, then rotate the residual stream by an
    orthonormal ``Q`` (randomized Hadamard when the hidden size allows, else seeded
    random orthogonal). Tied embeddings are untied (lm_head gets its own attribute).
    With ``online_down_proj`` an ``x·H`` node (two ``aten.matmul`` against constant
    Kronecker factors) is inserted before each MLP output projection whose width admits
    a Hadamard, and ``H`` is folded into that projection's weight.

    Preconditions: a float graph from ``capture``; RMSNorm models (LayerNorm models are
    skipped with a note). Position: first, before ``smooth``/``observe``/``gptq``.
    """

    name = "rotate"
    config_class = RotateConfig
    replay_mode = "rerun"  # deterministic given the graph and the config (seeded): load() runs it again

    def __init__(self, online_down_proj: bool = True, seed: int = 0):
        super().__init__(RotateConfig(online_down_proj, seed))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        try:
            plan = residual_plan(gm)
        except NotRotatable as e:
            ctx.note(self.name, f"rotation skipped: {e}", level="warning")
            return PassResult(gm, False)
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
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

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
            if _from_attention(s.x):
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
