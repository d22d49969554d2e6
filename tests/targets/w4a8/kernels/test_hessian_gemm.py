"""``qqq_cpu::hessian_gemm`` (csrc/hessian_gemm_cpu.cpp): GPTQ's ``[H; D]`` sums from a bf16
chunk ``[X | ΔX]``, bf16 products summed in fp32.

The reference is float64 matrix products of the same bf16 values, written out here. What it
must compute: ``H += XᵀX`` on each column slab's rows down to the slab's end (the rest is
mirrored by ``HessianAccumulator.result()``), ``D += ΔXᵀX`` in full, nothing else touched.
Measured against float64 (2,048 rows, K = 576 / 1536 / 4864): 2.4e-6 / 2.7e-6 / 2.7e-6
(largest entry error over largest entry); the floor is 2e-5. Torch's bf16 GEMM, whose products
are rounded to bf16, is ~1e-3: a fallback to it fails the floor."""

from __future__ import annotations

import pytest
import torch

from qqq_compile.targets.w4a8.kernels import cpu

pytestmark = pytest.mark.usefixtures("cpp_kernels")


@pytest.fixture(autouse=True)
def _bf16_cpu() -> None:
    if not cpu.cpu_has_bf16():
        pytest.skip("this CPU lacks AVX512-BF16: GPTQ uses torch's bf16 GEMM (tests/compiler/passes/test_gptq_fast.py)")


def _chunk(m: int, k: int, with_d: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    x[:, :3] *= 30  # outlier channels
    parts = [x, 0.05 * torch.randn(m, k, generator=g)] if with_d else [x]
    return torch.cat(parts, 1).bfloat16()


def _region(k: int, slab: int) -> torch.Tensor:
    """Where H is computed: column slab [j, j + slab), rows [0, j + slab)."""
    inside = torch.zeros(k, k, dtype=torch.bool)
    for j in range(0, k, slab):
        end = min(j + slab, k)
        inside[:end, j:end] = True
    return inside


@pytest.mark.parametrize(
    ("m", "k", "slab", "with_d"),
    [
        (2048, 576, 288, True),  # SmolLM2's widths
        (1999, 1536, 512, True),  # an odd row count: the last pair is padded
        (600, 4864, 512, True),  # Qwen2.5-0.5B's down_proj
        (301, 48, 48, False),  # three 16-column tiles: a 32-column item and a single tile
        (1100, 896, 448, False),  # plain GPTQ: H only, more than one 512-pair block
    ],
)
def test_sums_equal_float64_on_their_region_and_nothing_else(m, k, slab, with_d):
    a = _chunk(m, k, with_d, seed=k)
    before = torch.full(((2 if with_d else 1) * k + 5, k), 7.0)  # 5 rows past the sums
    sums = before.clone()
    packed = torch.empty((m + 1) // 2 * a.shape[1], dtype=torch.int32)
    calls = cpu.cpp_path_counts()["hessian_gemm"]
    torch.ops.qqq_cpu.hessian_gemm(sums, a, packed, k, slab)
    assert cpu.cpp_path_counts()["hessian_gemm"] == calls + 1
    ad = a.double()
    x = ad[:, :k]
    inside = _region(k, slab)
    ref_h = 7.0 + x.t() @ x
    err = (sums[:k][inside].double() - ref_h[inside]).abs().max() / ref_h.abs().max()
    assert err < 2e-5, err
    assert torch.equal(sums[:k][~inside], before[:k][~inside])  # rows below the slabs untouched
    if with_d:
        ref_d = 7.0 + ad[:, k:].t() @ x
        err_d = (sums[k : 2 * k].double() - ref_d).abs().max() / ref_d.abs().max()
        assert err_d < 2e-5, err_d
    tail = 2 * k if with_d else k
    assert torch.equal(sums[tail:], before[tail:])


def test_a_second_chunk_adds_to_the_sums():
    k = 256
    a, b = _chunk(700, k, True, 1), _chunk(500, k, True, 2)
    sums = torch.zeros(2 * k, k)
    packed = torch.empty(350 * 2 * k, dtype=torch.int32)
    torch.ops.qqq_cpu.hessian_gemm(sums, a, packed, k, k)
    torch.ops.qqq_cpu.hessian_gemm(sums, b, packed, k, k)
    both = torch.cat([a, b]).double()
    ref = torch.cat([both[:, :k].t() @ both[:, :k], both[:, k:].t() @ both[:, :k]])
    assert ((sums.double() - ref).abs().max() / ref.abs().max()) < 2e-5


def test_bad_arguments_are_named():
    k = 64
    a = _chunk(10, k, True, 0)
    sums, packed = torch.zeros(2 * k, k), torch.empty(5 * 2 * k, dtype=torch.int32)
    op = torch.ops.qqq_cpu.hessian_gemm
    with pytest.raises(RuntimeError, match="bf16"):
        op(sums, a.float(), packed, k, k)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(sums, a[:, :120], packed, 60, 60)
    with pytest.raises(RuntimeError, match="sums must be"):
        op(torch.zeros(k, k), a, packed, k, k)  # [H] only, but the chunk has ΔX
    with pytest.raises(RuntimeError, match="packed must be"):
        op(sums, a, packed[:100], k, k)


@pytest.mark.parametrize(("m", "k", "slab"), [(1999, 1536, 512), (600, 4864, 512), (301, 48, 48)])
@pytest.mark.parametrize("permuted", [False, True], ids=["natural", "permuted"])
def test_d_alone_over_the_slab_region_in_a_column_order(m, k, slab, permuted):
    """``h=False, d_upper=True`` (HessianAccumulator's deferred D): D's rows over H's slab
    region only, with the chunk's columns read through ``cols``; each entry bit for bit the
    full mode's entry of the permuted D (the same pairs in the same order), H's rows and
    everything outside the region untouched."""
    a = _chunk(m, k, True, seed=k + 1)
    packed = torch.empty((m + 1) // 2 * 2 * k, dtype=torch.int32)
    full = torch.zeros(2 * k, k)
    torch.ops.qqq_cpu.hessian_gemm(full, a, packed, k, slab)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if permuted else torch.arange(k)
    inside = _region(k, slab)
    sums = torch.full((2 * k + 3, k), 7.0)
    sums[k : 2 * k][inside] = 0.0
    before = sums.clone()
    torch.ops.qqq_cpu.hessian_gemm(sums, a, packed, k, slab, False, True, torch.cat([perm, perm + k]))
    want = full[k:][perm][:, perm]
    assert torch.equal(sums[k : 2 * k][inside], want[inside])
    assert torch.equal(sums[k : 2 * k][~inside], before[k : 2 * k][~inside])
    assert torch.equal(sums[:k], before[:k]) and torch.equal(sums[2 * k :], before[2 * k :])
    # The region holds the strict upper triangle: all that GPTAQ's solve reads.
    assert bool(inside.triu(1)[torch.ones(k, k, dtype=torch.bool).triu(1)].all())


def test_d_alone_arguments_are_named():
    k = 64
    a = _chunk(10, k, True, 0)
    sums, packed = torch.zeros(2 * k, k), torch.empty(5 * 2 * k, dtype=torch.int32)
    op = torch.ops.qqq_cpu.hessian_gemm
    cols = torch.arange(2 * k)
    with pytest.raises(RuntimeError, match="D only"):
        op(sums, a[:, :k], packed, k, k, False, True)
    with pytest.raises(RuntimeError, match="cols must be int64"):
        op(sums, a, packed, k, k, False, True, cols[:k])
    with pytest.raises(RuntimeError, match="outside a's 128 columns"):
        op(sums, a, packed, k, k, False, True, torch.where(cols == 5, 2 * k, cols))
