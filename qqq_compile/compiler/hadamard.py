"""Hadamard and random orthogonal matrices for the ``rotate`` pass (and anyone else).

A Hadamard matrix of order ``n`` is built as a Kronecker product of *base* orders and one
power of two (Sylvester). The bases are the orders ``4m`` (``m`` odd) that one of these
constructions reaches:

* Paley I: ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``: 12, 20, 28 (over GF(27)), 44,
  60, 68, 84, 108, 132, 140, ...;
* Paley II: ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``: 36 (q = 17), 52 (over
  GF(25)), 76 (q = 37), 100 (GF(49)), 124, 148 (q = 73), ...;
* Williamson: 156 and 172, from tabulated sequences (no Paley order fits them).

Every width of the popular models is covered, e.g. 896 = 28·32, 4864 = 76·64,
8960 = 140·64, 11008 = 172·64, 14336 = 28·512, 18944 = 148·128. The widths the first
version covered (12s, 20s and a power of two: 576 = 12·12·4, 1536 = 12·128) keep their
factorisation, so their matrices are unchanged bit for bit. Results are float64; callers
cast when they fold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch

#: Largest base order (the dense factor of an online transform is the product of the
#: bases: larger ones would make it a big matmul per token).
MAX_BASE = 1024

# Williamson sequences of lengths 39 and 43: four symmetric ±1 first rows A, B, C, D of
# circulants with A² + B² + C² + D² = 4mI, which give Hadamard matrices of orders 156 and
# 172 (:func:`williamson_hadamard`). Read off the order-156/172 matrices of QuaRot's
# ``fake_quant/hadamard_utils.py`` (github.com/spcl/QuaRot, adapted there from
# Cornell-RelaxML/quip-sharp), which are exactly this Williamson array.
_WILLIAMSON = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++---++++-+--+--++--------++--+--+-++++---+",
    ),
}


# ----------------------------------------------------------------------------- finite fields


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p**k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); coefficients low to high, ``f`` monic."""
    a, k = list(a), len(f) - 1
    for d in range(len(a) - 1, k - 1, -1):
        c = a[d] % p
        if c:
            for t in range(k + 1):
                a[d - k + t] = (a[d - k + t] - c * f[t]) % p
    return [x % p for x in a[:k]] + [0] * (k - len(a[:k]))


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p) (low to high):
    the one with no monic divisor of degree 1..k/2."""

    def polys(deg: int):
        for i in range(p**deg):
            yield [(i // p**t) % p for t in range(deg)] + [1]

    for f in polys(k):
        if f[0] and not any(not any(_polymod(f, g, p)) for d in range(1, k // 2 + 1) for g in polys(d)):
            return f
    raise AssertionError(f"GF({p}^{k}) has an irreducible polynomial")  # pragma: no cover - always does


def _gf(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GF(q) with elements numbered 0..q-1 (base-p digits are the coefficients):
    ``diff[i, j]`` = the number of ``x_j - x_i``, ``chi`` = the quadratic character."""
    pk = prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"Paley constructions need an odd prime power q, got {q}")
    p, k = pk
    if k == 1:  # the prime field: plain residues (the first version's arithmetic)
        squares = {(i * i) % q for i in range(1, q)}
        idx = torch.arange(q)
        diff = (idx[None, :] - idx[:, None]) % q
    else:
        f = _irreducible(p, k)
        digits = [[(e // p**t) % p for t in range(k)] for e in range(q)]
        squares = set()
        for d in digits[1:]:
            sq = [sum(d[i] * d[s - i] for i in range(max(0, s - k + 1), min(s, k - 1) + 1)) for s in range(2 * k - 1)]
            squares.add(sum(c * p**t for t, c in enumerate(_polymod(sq, f, p))))
        dig = torch.tensor(digits)
        weights = torch.tensor([p**t for t in range(k)])
        diff = (((dig[None, :, :] - dig[:, None, :]) % p) * weights).sum(-1)
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    return diff, chi


# ----------------------------------------------------------------------------- constructions


def paley_hadamard(q: int) -> torch.Tensor:
    """Paley construction I: a ±1 Hadamard matrix of order ``q + 1`` for a prime power
    ``q ≡ 3 (mod 4)`` (q = 11 gives H12, q = 19 H20, q = 27 H28 over GF(27))."""
    if prime_power(q) is None or q % 4 != 3:
        raise ValueError(f"Paley construction I needs a prime power q ≡ 3 mod 4, got {q}")
    diff, chi = _gf(q)
    jac = chi[diff]  # Jacobsthal matrix, antisymmetric here
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def paley2_hadamard(q: int) -> torch.Tensor:
    """Paley construction II: a ±1 Hadamard matrix of order ``2(q + 1)`` for a prime
    power ``q ≡ 1 (mod 4)`` (q = 13 gives H28, q = 17 H36, q = 25 H52 over GF(25))."""
    if prime_power(q) is None or q % 4 != 1:
        raise ValueError(f"Paley construction II needs a prime power q ≡ 1 mod 4, got {q}")
    diff, chi = _gf(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, chi[diff]
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, off) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on)


def williamson_hadamard(rows: tuple[str, str, str, str]) -> torch.Tensor:
    """The Williamson array ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``
    of the symmetric circulants whose first rows are given as ``+``/``-`` strings."""
    m = len(rows[0])
    i = torch.arange(m)
    shift = (i[None, :] - i[:, None]) % m
    a, b, c, d = (torch.tensor([1.0 if ch == "+" else -1.0 for ch in r], dtype=torch.float64)[shift] for r in rows)
    return torch.cat(
        [
            torch.cat([a, b, c, d], 1),
            torch.cat([-b, a, -d, c], 1),
            torch.cat([-c, d, a, -b], 1),
            torch.cat([-d, -c, b, a], 1),
        ]
    )


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of a power-of-two order ``n``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def base_construction(order: int) -> str | None:
    """How a base order ``4m`` (``m`` odd, ``order ≤ MAX_BASE``) is built: ``"paley1 q=…"``,
    ``"paley2 q=…"``, ``"williamson m=…"``, or None when none of them reaches it."""
    if order < 12 or order % 4 or (order // 4) % 2 == 0 or order > MAX_BASE:
        return None
    if prime_power(order - 1) is not None:  # order - 1 ≡ 3 (mod 4) for every order = 4m
        return f"paley1 q={order - 1}"
    if prime_power(order // 2 - 1) is not None:  # ≡ 1 (mod 4) for m odd
        return f"paley2 q={order // 2 - 1}"
    if order // 4 in _WILLIAMSON:
        return f"williamson m={order // 4}"
    return None


def base_hadamard(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix (float64) of a power of two or a base order."""
    if order & (order - 1) == 0:
        return sylvester_hadamard(order)
    how = base_construction(order)
    if how is None:
        raise ValueError(f"{order} is neither a power of two nor a base order ({supported_bases()[:8]}...)")
    kind, val = how.split()
    v = int(val.split("=")[1])
    if kind == "paley1":
        return paley_hadamard(v)
    if kind == "paley2":
        return paley2_hadamard(v)
    return williamson_hadamard(_WILLIAMSON[v])


def supported_bases() -> list[int]:
    """Every base order (not a power of two) up to :data:`MAX_BASE`."""
    return [o for o in range(12, MAX_BASE + 1, 8) if base_construction(o) is not None]


# ----------------------------------------------------------------------------- factorisation


def _first_version(n: int) -> list[int] | None:
    """The first version's rule: any number of 12s and 20s (Paley I) and one power of
    two, 12 tried first. Kept so the widths it covered keep their matrices."""
    if n & (n - 1) == 0:
        return [n] if n > 1 else []
    for base in (12, 20):
        if n % base == 0 and (rest := _first_version(n // base)) is not None:
            return [base, *rest]
    return None


def _split(odd: int, budget: int) -> list[int] | None:
    """The fewest odd factors ``m_i`` of ``odd`` (at most ``budget`` of them) that each
    have a base order ``4 m_i``; among equally few, the first with the smallest leading
    factor."""
    for r in range(budget + 1):
        if (got := _split_into(odd, r)) is not None:
            return got
    return None


def _split_into(odd: int, r: int) -> list[int] | None:
    if r == 0:
        return [] if odd == 1 else None
    for d in range(3, min(odd, MAX_BASE // 4) + 1, 2):
        if odd % d == 0 and base_construction(4 * d) is not None and (rest := _split_into(odd // d, r - 1)) is not None:
            return [d, *rest]
    return None


def hadamard_factors(n: int) -> list[int] | None:
    """Orders whose Kronecker product is an ``n``×``n`` Hadamard matrix, bases first and
    the power of two last (e.g. 576 → [12, 12, 4], 896 → [28, 32], 11008 → [172, 64]),
    or None when none is built.

    The first version's factorisations (12s, 20s, a power of two) come first; otherwise
    ``n = 2^e · odd`` is split into the fewest bases (each needs a factor 4), which keeps
    their product, the dense part of an online transform, smallest.
    """
    if n < 1:
        return None
    if (old := _first_version(n)) is not None:
        return old
    e = (n & -n).bit_length() - 1
    odd = n >> e
    parts = _split(odd, e // 2)
    if parts is None:
        return None
    pow2 = 1 << (e - 2 * len(parts))
    return [4 * m for m in parts] + ([pow2] if pow2 > 1 else [])


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal ``n``×``n`` Hadamard matrix (float64), or None if none is built."""
    r = Rotation.hadamard(n)
    return None if r is None else r.matrix()


def kron_matmul(x: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x·(M1 ⊗ … ⊗ Mr)`` over ``x``'s last axis without forming the product: the last
    factor as ``X·Mr``, each other one as ``Miᵀ·X`` on ``x`` viewed as ``[..., pre, mi, post]``
    (``k·(m1 + … + mr)`` work per row instead of ``k²``, and no ``k×k`` matrix)."""
    sizes = [m.shape[0] for m in mats]
    k, lead = math.prod(sizes), x.shape[:-1]
    y = x.reshape(*lead, k // sizes[-1], sizes[-1]) @ mats[-1]
    for i in reversed(range(len(mats) - 1)):
        y = mats[i].T @ y.reshape(*lead, math.prod(sizes[:i]), sizes[i], math.prod(sizes[i + 1 :]))
    return y.reshape(*lead, k)


def describe(n: int) -> str:
    """``"hadamard 28·32"`` for a width with a Hadamard, else ``"random orthogonal"``."""
    f = hadamard_factors(n)
    return "random orthogonal" if f is None else "hadamard " + "·".join(map(str, f or [1]))


#: The largest factor a Hadamard is *applied* with: a larger power of two is split into
#: Sylvester factors (``H_{2^(a+b)} = H_{2^a} ⊗ H_{2^b}`` exactly), so applying a Hadamard of
#: order ``n`` to a row costs ``n·(f1 + … + fr)`` multiply-adds instead of ``n²`` (4096: 128
#: instead of 4096 per entry).
APPLY_MAX_FACTOR = 64


def apply_factors(factors: Sequence[int]) -> list[int]:
    """``factors`` (from :func:`hadamard_factors`) with each power of two above
    :data:`APPLY_MAX_FACTOR` split into near-equal Sylvester factors: the same matrix."""
    out: list[int] = []
    for f in factors:
        if f & (f - 1) or f <= APPLY_MAX_FACTOR:
            out.append(f)
            continue
        e = f.bit_length() - 1
        parts = -(-e // (APPLY_MAX_FACTOR.bit_length() - 1))
        out += [1 << (e // parts + (i < e % parts)) for i in range(parts)]
    return out or [1]


@dataclass(frozen=True, eq=False)  # holds tensors: equal only to itself
class Rotation:
    """An orthonormal ``Q`` (float64) kept in the form that is cheapest to apply:
    ``diag(signs) · (F1 ⊗ … ⊗ Fr) / √n`` with ±1 factors ``F`` (a Hadamard; ``signs`` None: no
    sign flips), or ``dense`` (a width with no Hadamard). Applying the Kronecker form costs
    ``n·(f1 + … + fr)`` per row instead of ``n²``: rotating Qwen2.5-0.5B's 152k x 896
    embedding is 60 instead of 896 multiply-adds per entry."""

    n: int
    kind: str
    signs: torch.Tensor | None = None
    factors: tuple[torch.Tensor, ...] = ()
    dense: torch.Tensor | None = None

    @classmethod
    def hadamard(cls, n: int, signs: torch.Tensor | None = None) -> Rotation | None:
        """The orthonormal Hadamard of order ``n`` (rows flipped by ``signs``), or None."""
        f = hadamard_factors(n)
        if f is None:
            return None
        return cls(n, describe(n), signs, tuple(base_hadamard(k) for k in apply_factors(f)))

    def to(self, device: torch.device | str) -> Rotation:
        """The same rotation with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Rotation(self.n, self.kind, move(self.signs), tuple(map(move, self.factors)), move(self.dense))

    def matrix(self) -> torch.Tensor:
        """``Q`` as a dense float64 matrix."""
        if self.dense is not None:
            return self.dense
        h = reduce(torch.kron, self.factors) / math.sqrt(self.n)
        return h if self.signs is None else self.signs[:, None] * h

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Q`` over ``x``'s last axis (float64 in, float64 out)."""
        if self.dense is not None:
            return x @ self.dense.to(x.device)
        if self.signs is not None:
            x = x * self.signs.to(x.device)
        return kron_matmul(x, [f.to(x.device) for f in self.factors]).mul_(1.0 / math.sqrt(self.n))

    def left_t(self, x: torch.Tensor) -> torch.Tensor:
        """``Qᵀ · x`` over ``x``'s first axis (a vector or a matrix ``[n, m]``), contiguous."""
        if x.dim() == 1:
            return self.right(x)
        return self.right(x.T).T.contiguous()


def rotation(n: int, seed: int = 0) -> Rotation:
    """The residual stream's rotation of width ``n``: a Hadamard with seeded random signs on
    its rows when one of order ``n`` can be built, else a seeded random orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    if hadamard_factors(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return Rotation.hadamard(n, signs)  # type: ignore[return-value]
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Rotation(n, "random orthogonal", dense=q * torch.sign(torch.diagonal(r))[None, :])


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``rotation(n, seed)`` as a dense matrix, with its kind."""
    r = rotation(n, seed)
    return r.matrix(), r.kind


__all__ = [
    "APPLY_MAX_FACTOR",
    "MAX_BASE",
    "Rotation",
    "apply_factors",
    "base_construction",
    "base_hadamard",
    "describe",
    "hadamard",
    "hadamard_factors",
    "kron_matmul",
    "paley2_hadamard",
    "paley_hadamard",
    "prime_power",
    "rotation",
    "rotation_matrix",
    "supported_bases",
    "sylvester_hadamard",
    "williamson_hadamard",
]
