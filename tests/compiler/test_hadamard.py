"""Hadamard matrices: every order built is exactly Hadamard (integer ``H Hᵀ = n I``), the
widths of popular models factor into built orders, and the first version's widths keep
their matrices bit for bit."""

from __future__ import annotations

import hashlib
import math
import string
from functools import reduce

import pytest
import torch

from qqq_compile.compiler.hadamard import (
    APPLY_MAX_FACTOR,
    MAX_BASE,
    Rotation,
    apply_factors,
    base_construction,
    base_hadamard,
    hadamard,
    hadamard_factors,
    kron_matmul,
    paley2_hadamard,
    paley_hadamard,
    prime_power,
    rotation,
    rotation_matrix,
    supported_bases,
)


def assert_hadamard(h: torch.Tensor) -> None:
    """±1 entries and ``H Hᵀ = n I`` in exact integer arithmetic."""
    n = h.shape[0]
    hi = h.to(torch.int64)
    assert torch.equal(hi.to(h.dtype), h) and torch.equal(hi.abs(), torch.ones_like(hi))
    assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=torch.int64))


# QuaRot/SpinQuant's tabulated orders, 76 and 148 (Paley II), and the bases the
# Kronecker products of the real widths below need.
NAMED = [12, 20, 28, 36, 44, 52, 60, 76, 108, 140, 148, 156, 172]


@pytest.mark.parametrize("order", [o for o in supported_bases() if o <= 256])
def test_every_base_order_up_to_256_is_hadamard(order):
    assert_hadamard(base_hadamard(order))


@pytest.mark.slow
def test_every_base_order_is_hadamard():
    # 86 orders up to MAX_BASE; 34 s on the 2-core machine under load.
    for order in supported_bases():
        assert_hadamard(base_hadamard(order))


def test_named_orders_and_how_they_are_built():
    assert set(NAMED) <= set(supported_bases())
    assert base_construction(12) == "paley1 q=11" and base_construction(20) == "paley1 q=19"
    assert base_construction(28) == "paley1 q=27"  # over GF(27)
    assert base_construction(36) == "paley2 q=17"
    assert base_construction(52) == "paley2 q=25"  # over GF(25)
    assert base_construction(76) == "paley2 q=37" and base_construction(148) == "paley2 q=73"
    assert base_construction(156) == "williamson m=39" and base_construction(172) == "williamson m=43"
    # Orders that exist but need constructions not built here (Williamson 23 and 29),
    # and ones that are no base (even m, or a power of two).
    for order in (92, 116, 24, 64, MAX_BASE + 4):
        assert base_construction(order) is None
    for order in [4, 8, 16, 40, 24, 56]:  # powers of two and base·2^k
        mats = [base_hadamard(k) for k in hadamard_factors(order)]
        assert_hadamard(reduce(torch.kron, mats))
        assert torch.equal(hadamard(order), reduce(torch.kron, mats) / math.sqrt(order))


def test_paley_over_prime_power_fields():
    assert prime_power(27) == (3, 3) and prime_power(25) == (5, 2) and prime_power(45) is None
    for h in (paley_hadamard(27), paley2_hadamard(25), paley2_hadamard(49), paley2_hadamard(13)):
        assert_hadamard(h)  # orders 28, 52, 100, 28
    with pytest.raises(ValueError, match="3 mod 4"):
        paley_hadamard(13)
    with pytest.raises(ValueError, match="1 mod 4"):
        paley2_hadamard(27)
    with pytest.raises(ValueError, match="prime power"):
        paley_hadamard(15)


WIDTHS = {
    896: [28, 32],  # Qwen2.5-0.5B hidden
    4864: [76, 64],  # Qwen2.5-0.5B MLP
    8960: [140, 64],  # Qwen2.5-1.5B MLP
    11008: [172, 64],  # Llama-2-7B MLP
    14336: [28, 512],  # Llama-3-8B / Mistral-7B MLP
    18944: [148, 128],  # Qwen2.5-7B MLP
    13824: [12, 12, 12, 8],  # Llama-2-13B MLP: the first version's rule, kept
    29568: [924, 32],  # Qwen2.5-72B MLP
}


def _apply_factors(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """x·(M1 ⊗ … ⊗ Mr) by einsum over x viewed as [rows, m1, …, mr] (the reference)."""
    letters = string.ascii_lowercase[: len(mats)]
    y = x.reshape(x.shape[0], *(m.shape[0] for m in mats))
    for i, m in enumerate(mats):
        out = letters[:i] + "Z" + letters[i + 1 :]
        y = torch.einsum(f"R{letters},{letters[i]}Z->R{out}", y, m)
    return y.reshape(x.shape)


@pytest.mark.parametrize("n", list(WIDTHS))
def test_real_widths_are_kronecker_products_of_built_orders(n):
    f = hadamard_factors(n)
    assert f == WIDTHS[n] and math.prod(f) == n
    mats = [base_hadamard(k) for k in f]
    for m in mats:
        assert_hadamard(m)
    # H Hᵀ = n I on random integer rows, exactly (float64 holds these integers), through
    # the factors: the n×n product is 2.9 GB at n = 18944.
    x = torch.randint(-3, 4, (4, n), generator=torch.Generator().manual_seed(n)).double()
    y = _apply_factors(x, mats)
    assert torch.equal(_apply_factors(y, [m.T for m in mats]), n * x)
    assert torch.equal(kron_matmul(x, mats), y)  # the fold's path agrees with the reference
    if n <= 1024:  # small enough to form: the whole matrix, and hadamard() is it normalised
        h = torch.kron(*mats)
        assert_hadamard(h)
        assert torch.equal(hadamard(n), h / math.sqrt(n))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def test_first_version_widths_keep_their_matrices():
    """SmolLM2's widths (576 residual, 1536 MLP) and the first version's rule (12s, 20s,
    a power of two) give the same factorisations and bit-identical matrices. The hashes
    were taken from the first version (commit 41e9231, hadamard.py before Paley II)."""
    assert hadamard_factors(576) == [12, 12, 4] and hadamard_factors(1536) == [12, 128]
    assert hadamard_factors(160) == [20, 8] and hadamard_factors(240) == [12, 20]
    assert _sha(hadamard(576)) == "22b10b0649c8a6eb"
    assert _sha(rotation_matrix(576, seed=0)[0]) == "8839fb5fc4593d0e"
    assert _sha(torch.kron(hadamard(12), hadamard(128))) == "3bc53aa4cc662fe8"


def test_widths_without_a_hadamard():
    for n in (6, 14, 30, 92, 4 * 23 * 64, 4 * 29 * 128):  # not 1, 2 or 4k; or Williamson 23, 29
        assert hadamard_factors(n) is None and hadamard(n) is None
    for n in (30, 92):
        q, kind = rotation_matrix(n, seed=1)
        assert kind == "random orthogonal"
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
        assert torch.equal(q, rotation_matrix(n, seed=1)[0]) and not torch.equal(q, rotation_matrix(n, seed=2)[0])


def test_powers_of_two_are_applied_as_small_sylvester_factors():
    """A power of two above APPLY_MAX_FACTOR is split into near-equal Sylvester factors whose
    Kronecker product is exactly the same ±1 matrix."""
    assert apply_factors([12, 128]) == [12, 16, 8] and apply_factors([76, 64]) == [76, 64]
    assert apply_factors([4096]) == [64, 64] and apply_factors([8192]) == [32, 16, 16]
    assert apply_factors([]) == [1] and apply_factors([148, 128]) == [148, 16, 8]
    for f in (128, 1024, 8192):
        parts = apply_factors([f])
        assert max(parts) <= APPLY_MAX_FACTOR and math.prod(parts) == f
        if f <= 1024:
            assert torch.equal(reduce(torch.kron, [base_hadamard(p) for p in parts]), base_hadamard(f))


@pytest.mark.parametrize("n", [64, 92, 576, 896, 1536, 4096, 4864])
def test_rotation_applied_by_factors_equals_the_dense_matrix(n):
    """``Rotation.right`` / ``left_t`` (Kronecker factors, random row signs) against the
    formed float64 matrix, which is bit for bit the one rotation_matrix gave before
    (test_first_version_widths_keep_their_matrices), to float64 rounding."""
    r = rotation(n, seed=5)
    q = r.matrix()
    assert torch.equal(q, rotation_matrix(n, seed=5)[0])
    assert r.kind == ("random orthogonal" if n == 92 else f"hadamard {'·'.join(map(str, hadamard_factors(n)))}")
    assert (r.dense is not None) == (n == 92)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(r.right(x), x @ q, rtol=0, atol=1e-13)
    w = torch.randn(n, 7, generator=g, dtype=torch.float64)
    lt = r.left_t(w)
    assert lt.is_contiguous()
    torch.testing.assert_close(lt, q.T @ w, rtol=0, atol=1e-13)
    torch.testing.assert_close(r.left_t(w[:, 0]), q.T @ w[:, 0], rtol=0, atol=1e-13)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=q.dtype), rtol=0, atol=1e-12)
    if n != 92:  # the unsigned Hadamard is hadamard(n)
        h = Rotation.hadamard(n)
        assert h.signs is None
        torch.testing.assert_close(h.right(x), x @ hadamard(n), rtol=0, atol=1e-13)
