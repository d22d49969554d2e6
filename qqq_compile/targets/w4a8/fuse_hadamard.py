"""``fuse_hadamard``: the decode step's online Hadamard chains become one C++ kernel call.

The rotate pass writes ``x·(F1 ⊗ … ⊗ Fr)`` before each MLP output projection as torch ops
(an ``mm`` for the last factor, a ``bmm`` of a broadcast factor for each other one): ops any
backend runs, and the graph that calibration and every export see. On the CPU that chain
is slow where it matters for generation: SmolLM2's (1536 = 12·128) took 0.6-1.7 ms per
layer for a 256-token prefill chunk (a quarter of the prefill) and 17 us per layer at
decode. The step graph (CPU, C++ kernels loaded) calls ``qqq_cpu::kron_transform`` instead,
which applies each factor along its own axis; a Sylvester factor is split into Sylvester
factors of at most 16 (``H_ab = H_a ⊗ H_b``, exactly), so 128 costs 8 + 16 multiply-adds per
element instead of 128. Same function, float rounding aside (both are fp32 sums; measured
130-139 dB against float64 for every covered width, as the chain).

Like ``fuse_linears`` it is a step rewrite, not a pipeline pass: the compiled model's own
graph keeps the portable chain.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.hadamard import sylvester_hadamard
from qqq_compile.graph import get_attr

aten = torch.ops.aten
_SPLIT = 16  # largest Sylvester factor the kernel gets: its last axis is one 16-lane vector


def _matrix(gm: GraphModule, n: object) -> torch.Tensor | None:
    """The constant behind ``view(get_attr, [f, f])`` (the pass's factor nodes)."""
    if not (isinstance(n, Node) and n.target is aten.view.default and isinstance(n.args[0], Node)):
        return None
    src = n.args[0]
    t = get_attr(gm, src.target) if src.op == "get_attr" else None
    f = n.args[1][0] if isinstance(n.args[1], (list, tuple)) else None
    if t is None or not isinstance(f, int) or t.numel() != f * f:
        return None
    return t.reshape(f, f)


def chain(gm: GraphModule, y: Node) -> tuple[Node, list[torch.Tensor], list[Node]] | None:
    """``(x, [F1..Fr], ops)`` for the chain ending in ``y`` (``ops``: its ``bmm`` nodes from
    ``y`` back, then the ``mm`` that reads ``x``); None when it is not the rotate pass's
    shape (then it is left alone)."""
    if y.target is not aten.view.default:
        return None
    mats, ops, n = [], [], y.args[0]
    while isinstance(n, Node):
        if n.target is aten.bmm.default:
            ft, prev = n.args
            if not (ft.target is aten.expand.default and ft.args[0].target is aten.t.default):
                return None
            f = _matrix(gm, ft.args[0].args[0])
            if f is None or prev.target is not aten.view.default:
                return None
            mats.append(f)  # Fᵀ·X over [rows, f, post] is X·F along that axis
            ops.append(n)
            n = prev.args[0]
        elif n.target is aten.mm.default:
            r, v = n.args
            f = _matrix(gm, v)
            if f is None or r.target not in (aten.reshape.default, aten.view.default):
                return None
            mats.append(f)
            ops.append(n)
            return r.args[0], mats, ops
        else:
            return None
    return None


def kron_factors(mats: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The kernel's operands for a chain's matrices: the factors (Sylvester ones split into
    orders ≤ 16) flattened into one fp32 tensor, and their orders."""
    factors = [s for m in mats for s in _split_sylvester(m.float())]
    return torch.cat([f.reshape(-1) for f in factors]), [int(f.shape[0]) for f in factors]


def _split_sylvester(m: torch.Tensor) -> list[torch.Tensor]:
    """``m`` as Kronecker factors: a normalised Sylvester matrix of order p > 16 as
    factors of order ≤ 16 (same matrix exactly), anything else as itself."""
    p = m.shape[0]
    if p <= _SPLIT or p & (p - 1):
        return [m]
    if not torch.allclose(m.double(), sylvester_hadamard(p) / math.sqrt(p), rtol=0, atol=1e-7):
        return [m]
    out, rest = [], p
    while rest > _SPLIT:
        out.append(_SPLIT)
        rest //= _SPLIT
    sizes = ([rest] if rest > 1 else []) + out
    return [(sylvester_hadamard(s) / math.sqrt(s)).to(m.dtype) for s in sizes]


def fuse_online_hadamard(gm: GraphModule) -> int:
    """Replace every online Hadamard chain of ``gm`` (nodes annotated ``online_hadamard``)
    by one ``qqq_cpu::kron_transform`` call; returns how many. Requires the C++ kernels
    (the caller checks); float32 activations on the CPU only (others keep the chain)."""
    kron = torch.ops.qqq_cpu.kron_transform.default
    g, done = gm.graph, 0
    for y in list(g.nodes):
        if y.op != "call_function" or not node_annotation(y).online_hadamard:
            continue
        found = chain(gm, y)
        val = y.meta.get("val")
        if found is None or val is None or val.dtype != torch.float32 or val.device.type != "cpu":
            continue
        x, mats, _ = found
        flat, sizes = kron_factors(mats)
        name = _factor_buffer(gm, flat.to(val.device), sizes)
        with g.inserting_before(y):
            attr = g.get_attr(name)
            new = g.call_function(kron, (x, attr, sizes))
        new.meta = {**y.meta, "val": val}
        y.replace_all_uses_with(new)
        done += 1
    if done:
        _drop_dead(g)
        g.lint()
        gm.recompile()
    return done


def _factor_buffer(gm: GraphModule, flat: torch.Tensor, sizes: list[int]) -> str:
    """The name of a buffer of ``gm`` holding ``flat``: one per distinct set of factors
    (every layer of one width shares it)."""
    base, i = "qqq_kron_" + "x".join(map(str, sizes)), 0
    name = base
    while hasattr(gm, name):
        if torch.equal(getattr(gm, name), flat):
            return name
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, flat)
    return name


# What a chain is made of: pure ops, dropped once nothing reads them.
_PURE = {
    aten.view.default,
    aten.reshape.default,
    aten.t.default,
    aten.expand.default,
    aten.bmm.default,
    aten.mm.default,
    aten.sym_size.int,
}


def _drop_dead(g: torch.fx.Graph) -> None:
    for n in reversed(list(g.nodes)):
        if n.users:
            continue
        if (n.op == "call_function" and n.target in _PURE) or (
            n.op == "get_attr" and str(n.target).startswith("qqq_hadamard_")
        ):
            g.erase_node(n)
