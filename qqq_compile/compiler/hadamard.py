"""Hadamard and random orthogonal matrices for the ``rotate`` pass (and anyone else).

Orders built: powers of two (Sylvester), 12 and 20 (Paley construction I) and their
Kronecker products (e.g. 576 = 12·12·4, 1536 = 12·128). Everything is float64 and
orthonormal; callers cast when they fold.
"""

from __future__ import annotations

import math
from functools import reduce

import torch


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


__all__ = ["hadamard", "hadamard_factors", "paley_hadamard", "rotation_matrix"]
