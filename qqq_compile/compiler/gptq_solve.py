"""GPTQ's column solve (Frantar et al. 2022) onto a :class:`~qqq_compile.targets.w4a8.grid.Grid`,
with GPTAQ's asymmetric-calibration term (Li et al. 2025) as an option.

Plain GPTQ minimises ``||(W - Ŵ) X̃||²`` for the input ``X̃`` the quantized layer sees.
GPTAQ targets the float model's output instead, ``||W X - Ŵ X̃||²``: with
``ΔX = X - X̃`` the extra matrix ``D = 2/n · ΔXᵀ X̃`` enters through
``P = α · triu₁(D Uᵀ) U`` (``U``: upper Cholesky factor of ``H⁻¹``), and quantizing
column ``i`` also adds ``w_i · P[i, i+1:]`` to the later columns: column ``i``'s share of
the asymmetry ``w_i ΔX_i``, least-squares compensated through the inputs not yet fixed.
(The published code applies that term with the unquantized column inside a block but with
the quantized one in the lazy update across blocks; here both use the unquantized one.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qqq_compile.targets.registry import Grid

MAX_RETRIES = 4  # damping grows 10x per retry: 1% → 10% → 100% → 1000% → 10000% of mean diag


class GPTQError(RuntimeError):
    """GPTQ could not quantize a linear (non-finite Hessian, Cholesky never succeeded)."""


@dataclass
class PermutedD:
    """GPTAQ's ``D`` with rows and columns already in the solve's column order ``perm``, valid
    on and above the diagonal (at least: the column slabs' upper part; zeros elsewhere). The
    solve reads only its strict upper triangle, so :class:`HessianAccumulator` computes no
    more. :func:`gptq_quantize` consumes it (writes over ``d``)."""

    d: torch.Tensor
    perm: torch.Tensor


def solve_permutation(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The solve's column order: descending ``diag(H)`` (dead inputs, ``H_ii = 0``, sorting as
    if ``H_ii = 1``, the value they get; stable, as in the reference) or the natural order."""
    k = h.shape[0]
    if not act_order:
        return torch.arange(k, device=h.device)
    diag = torch.diagonal(h).float()
    return torch.argsort(diag.masked_fill(diag == 0, 1.0), descending=True, stable=True)


@dataclass
class GPTQResult:
    q4: torch.Tensor  # int8 [N, K], original column order
    deq: torch.Tensor  # float32 [N, K]: exactly what the packed weight decodes to
    row_loss: torch.Tensor  # [N] GPTQ's loss sum (w - q)^2 / (2 [H^-1]_ii^2) per row
    damp: float  # relative damping that worked (fraction of mean diag(H))
    retries: int
    dead: int  # input channels with H_ii = 0 (weights zeroed)


HESSIAN_DTYPES = ("bfloat16", "float32")
#: Column orders a :class:`HessianAccumulator` can hand GPTAQ's ``D`` over in
#: (``solve_order``): None keeps ``D`` whole in the inputs' order.
SOLVE_ORDERS = (None, "act", "natural")
#: Deferred ``D`` keeps its chunks while they take at most this many times the sums' bytes
#: (Qwen2.5-0.5B's down_proj, K = 4864, 32 windows of 512: 318 MB beside 189 MB of sums).
DEFER_BUDGET = 2
#: Column tiles of the solve's triangular factors: only tiles that can be nonzero are computed.
#: Widths measured at K = 4864: GPTAQ's ``P`` 744 ms with 256, 810 with 512; ``U`` 1081 / 888.
P_TILE = 256
U_TILE = 512
#: bf16 Hessian chunks (rows): the first chunk of each sum holds ``FIRST_CHUNK // sum rows``
#: rows (16 MiB of bf16 ``[X | ΔX]``, 256 to ``CHUNK_MAX`` rows); where that is under
#: ``CHUNK_MIN``, each later chunk takes as many rows as the sum has seen (so the expectation
#: it is measured against comes from at least as many rows), up to ``CHUNK_MIN``. Each flush
#: also makes a few passes over the ``K x K`` sums, so at wide K fixed short chunks let those
#: passes cost as much as the GEMM (K = 11008: 381-row chunks).
FIRST_CHUNK = 1 << 23
CHUNK_MIN, CHUNK_MAX = 2048, 4096


class HessianAccumulator:
    """``H = 2/n · Σ XᵀX`` and, for GPTAQ, ``D = 2/n_D · Σ (X_float - X)ᵀ X`` over batches of rows
    (``n_D``: the rows given with ``x_float``; a GPTAQ batch without it adds to ``H`` only).

    ``dtype="float32"``: one fp32 GEMM per batch (the reference). ``"bfloat16"``: rows are
    gathered into chunks (``[X | X_float - X]`` side by side, rounded to bf16) and each
    chunk's ``[H; D]`` share is one bf16 GEMM added to fp32 sums: 2-4x faster on CPUs with
    AVX512-BF16 or AMX. Rounding the inputs perturbs each token's contribution by at most
    2⁻⁹ relative. The measured effect on the solve is in
    ``tests/compiler/passes/test_gptq_fast.py``.

    On CPUs with AVX512-BF16 (and ``K`` a multiple of 16) the C++ kernel
    ``qqq_cpu::hessian_gemm`` adds each chunk's bf16 products into the sums in fp32, in
    whole buffers: H within ~1e-6 of float64 on the same bf16 rows, and 1.35-1.45x faster
    than torch's path below at K = 1536 / 4864 (16 k rows, alternating in one process).

    Torch's path (other CPUs and devices): CPU torch has no bf16 GEMM with an fp32 result,
    so each chunk's product is rounded to bf16 once; to keep that rounding small, the GEMM
    (``addmm``, whose sum is fp32 inside) subtracts the chunk's expected share of the sums
    so far and only the deviation is rounded (10x less error than rounding the product;
    the first chunk of each sum runs in fp32). (A shorter fp32 first chunk, 1024 rows, saved
    ~0.15 s of a 6 s GPTQ block but left the second chunk measured against a noisier
    expectation: H's error +15-30% in the tests, SmolLM2's perplexity +0.9-1.1% in one run.)
    At wide K (first chunks under ``CHUNK_MIN`` rows), after each sum's first chunk a chunk
    takes as many rows as the sum has seen (up to ``CHUNK_MIN``), so the passes over the sums
    that every flush makes stop costing as much as the GEMM (K = 11008, 8000 rows: 18.6 ->
    12.2 s; H's error +3-4%).

    Given the solve's column order (``solve_order``: ``"act"`` or ``"natural"``; the GPTQ pass
    gives it), GPTAQ's ``D`` is not summed as the chunks come: the kernel adds only ``H`` and
    the ``[X | ΔX]`` chunks are kept, and ``result()`` sums ``D`` in the solve's order over
    ``H``'s slab region, the strict upper triangle the solve reads and little more, returning a
    :class:`PermutedD`. Every entry the solve reads is the one summed whole, bit for bit (the
    same pairs in the same order), at 0.55 of D's work: Qwen2.5-0.5B's down_proj (K = 4864) over
    16 k rows 3.02 -> 2.40 s. Chunks are kept while they take at most :data:`DEFER_BUDGET` x
    the sums' bytes (past that, their ``D`` is added whole at once and the rest as before), in
    buffers taken from and returned to ``pool`` (:class:`ChunkPool`).

    Rows with and without their float input go to two buffers (``[X | ΔX]`` and ``[X]``), so
    GPTAQ's alternating batches (``GPTQ(asym_tokens=...)``) fill whole chunks instead of
    flushing a part-filled one at every switch. Column slabs keep torch's GEMM output (the
    only ``K x K``-sized transient besides the sums) to at most 512 columns; both paths skip the
    part of ``H`` below the diagonal slabs (``H`` is symmetric: mirrored at the end); ``K``
    above 256 takes at least two slabs, which saves a quarter of ``H``'s work at ``K = 576``.
    """

    def __init__(
        self,
        k: int,
        *,
        asym: bool = False,
        dtype: str = "bfloat16",
        chunk_rows: int | None = None,
        device: torch.device | str | None = None,
        solve_order: str | None = None,
        pool: ChunkPool | None = None,
    ):
        if dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian dtype must be one of {HESSIAN_DTYPES}, got {dtype!r}")
        if solve_order not in SOLVE_ORDERS:
            raise ValueError(f"solve_order must be one of {SOLVE_ORDERS}, got {solve_order!r}")
        self.k, self.n, self.n_d, self.asym = k, 0, 0, asym
        self.solve_order = solve_order
        self.kept: list[torch.Tensor] = []  # [X | ΔX] chunks whose D waits for the solve's order
        self._kept_bufs: list[torch.Tensor] = []  # the staging buffers that hold them
        self._final = False  # in result(): the last flush needs no new staging buffer
        self.pool = pool if pool is not None else ChunkPool()
        self.defer = False  # set in _alloc: D deferred (the kernel, GPTAQ and a solve order)
        self.bf16 = dtype == "bfloat16"
        self._chunk_rows = chunk_rows
        # The sums and buffers are made on ``device`` if given, else on the device of the
        # first batch (the calibration activations'), so a CUDA model's Hessians stay on it.
        self.sums: torch.Tensor | None = None
        self.bufs: dict[bool, torch.Tensor] = {}  # with_d -> bf16 rows [X | ΔX] or [X]
        self.fills = {False: 0, True: 0}
        self.est = None  # torch's path: a slab of each chunk's expected share, bf16
        self._gemm: Any = None  # qqq_cpu::hessian_gemm when it runs this accumulator's chunks
        self.packed: torch.Tensor | None = None  # its scratch buffer
        self.rows_flushed = self.rows_flushed_d = 0
        if device is not None:
            self._alloc(torch.device(device))

    def _alloc(self, device: torch.device | None) -> None:
        k = self.k
        self.sums = torch.zeros((2 if self.asym else 1) * k, k, device=device)  # [H; D], unscaled
        if self.bf16:
            self._gemm = _cpp_gemm(k, self.sums.device)
            first = max(256, min(CHUNK_MAX, FIRST_CHUNK // self.sums.shape[0]))
            self._first_rows = self._chunk_rows or first
            # Chunks grow only where the first is short (K above 2048 with GPTAQ, 4096
            # without): narrower sums keep their fixed chunks, and their exact values.
            rows = self._chunk_rows or max(first, CHUNK_MIN)
            self.bufs[False] = torch.empty(rows, k, dtype=torch.bfloat16, device=device)
            if self.asym:
                self.bufs[True] = self.pool.take((rows, 2 * k), torch.bfloat16, device)
            if self._gemm is not None:  # the kernel's row-pair tiles of the widest chunk
                width = (2 if self.asym else 1) * k
                self.packed = torch.empty((rows + 1) // 2 * width, dtype=torch.int32, device=device)
                self.defer = self.asym and self.solve_order is not None
            else:
                self.est = torch.empty(k, self._slab_width(), dtype=torch.bfloat16, device=device)

    def _slab_width(self) -> int:
        k = self.k
        if k <= 256:
            return k
        return min(512, -(-k // 2 // 32) * 32)  # two slabs up to K = 1024, then 512 columns

    @property
    def device(self) -> torch.device | None:
        """Where the sums live (None before the first batch when no device was given)."""
        return None if self.sums is None else self.sums.device

    def add(
        self,
        x: torch.Tensor | None = None,
        x_float: torch.Tensor | None = None,
        *,
        q: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``x`` ``[..., K]`` (what the linear multiplies) or, for an int8
        input, its codes ``q`` and per-row ``scale`` (``x = q · scale``); for GPTAQ also the
        float model's input ``x_float`` (same shape), or None for a batch that adds to ``H``
        only."""
        if (x is None) == (q is None):
            raise ValueError("give either x or q and scale")
        if x_float is not None and not self.asym:
            raise ValueError("x_float is for GPTAQ: make the accumulator with asym=True")
        k = self.k
        if q is not None:
            q, scale = q.reshape(-1, k), scale.reshape(-1, 1)
            rows = q.shape[0]
        else:
            x = x.detach().reshape(-1, k)
            rows = x.shape[0]
        xf = None if x_float is None else x_float.detach().reshape(-1, k)
        if self.sums is None:
            self._alloc((x if x is not None else q).device)
        self.n += rows
        self.n_d += rows if xf is not None else 0
        if not self.bf16:
            x = x.float() if x is not None else q.float().mul_(scale)
            if xf is not None:
                self.sums[k:].addmm_((xf.float() - x).t(), x)
            self.sums[:k].addmm_(x.t(), x)
            return
        with_d = xf is not None
        stage = _cpp_stage(self.bufs[with_d], x, q, scale, xf)
        flat_scale = None if scale is None else scale.reshape(-1)  # the C++ pass takes [M]
        i = 0
        while i < rows:
            fill, cap = self.fills[with_d], self._capacity(with_d)
            m = min(rows - i, cap - fill)
            # (A flush that keeps the chunk for D replaces the buffer: look it up each time.)
            dst, src = self.bufs[with_d][fill : fill + m], slice(i, i + m)
            if stage is not None:  # the same values in one pass (csrc/hessian_cpu.cpp)
                stage(dst, *(None if t is None else t[src] for t in (x, q, flat_scale, xf)))
            else:
                xs = q[src].float().mul_(scale[src]) if q is not None else x[src]
                dst[:, :k] = xs
                if with_d:
                    dst[:, k:] = xf[src] - xs
            self.fills[with_d] = fill + m
            i += m
            if fill + m == cap:
                self._flush(with_d)

    def _capacity(self, with_d: bool) -> int:
        """Rows the next chunk of this buffer takes: the first chunk's size until its sums
        have seen rows, then as many rows as they have seen (at most the buffer)."""
        if self._gemm is not None:  # no expectation to measure against: whole buffers
            return self.bufs[with_d].shape[0]
        seen = min(self.rows_flushed, self.rows_flushed_d) if with_d else self.rows_flushed
        return max(self._first_rows, min(seen, self.bufs[with_d].shape[0]))

    def _flush(self, with_d: bool) -> None:
        fill = self.fills[with_d]
        if not self.bf16 or fill == 0:
            return
        a = self.bufs[with_d][:fill]
        if with_d and self.defer:  # H now; the chunk is kept for D (result())
            self._gemm(self.sums, a[:, : self.k], self.packed, self.k, self._slab_width())
            self._keep(a)
        elif self._gemm is not None:  # fp32 sums of bf16 products, the same slabs
            self._gemm(self.sums, a, self.packed, self.k, self._slab_width())
        else:
            self._add_torch(a, with_d)
        self.rows_flushed += fill
        self.rows_flushed_d += fill if with_d else 0
        self.fills[with_d] = 0

    def _add_torch(self, a: torch.Tensor, with_d: bool) -> None:
        """Torch's path: add chunk ``a``'s share to the sums, slab by slab."""
        k, width, fill = self.k, self._slab_width(), a.shape[0]
        a_f = None  # a sum's first rows in fp32: the later chunks are measured against them
        for j in range(0, k, width):
            cols = slice(j, min(j + width, k))
            # H is symmetric: per column slab only the rows down to the slab's end (the
            # rest is mirrored in result()); D = ΔXᵀX̃ in full.
            parts = [(slice(0, cols.stop), self.rows_flushed)]
            parts += [(slice(k, 2 * k), self.rows_flushed_d)] if with_d else []
            for rows, seen in parts:
                tgt = self.sums[rows, cols]
                if seen == 0:
                    a_f = a.float() if a_f is None else a_f
                    tgt += a_f[:, rows].t() @ a_f[:, cols]
                    continue
                # The GEMM adds -E (this chunk's expected share of the sums so far) before
                # its one rounding to bf16, so only the chunk's deviation from E is rounded.
                est = torch.mul(tgt, fill / seen, out=self.est[: tgt.shape[0], : tgt.shape[1]])
                tgt += torch.addmm(est, a[:, rows].t(), a[:, cols], beta=-1.0)
                tgt += est

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(H, D)`` (``D`` None without GPTAQ); the accumulator is spent afterwards."""
        if self.sums is None:  # no batch and no device given: zero sums on torch's default device
            self._alloc(None)
        self._final = True
        self._flush(True)
        self._flush(False)
        k = self.k
        if self.bf16:  # mirror the upper part of H that _flush computed
            width = self._slab_width()
            for j in range(width, k, width):
                end = min(j + width, k)
                self.sums[j:end, :j] = self.sums[:j, j:end].t()
        sums = self.sums
        sums[:k].mul_(2.0 / max(self.n, 1))
        d: torch.Tensor | PermutedD | None = sums[k:] if self.asym else None
        if self.defer:  # D in the solve's order, over H's slab region (all the solve reads)
            perm = solve_permutation(sums[:k], self.solve_order == "act")
            cols = torch.cat([perm, perm + k])
            for a in self.kept:  # the kernel reads each chunk's columns through cols
                self._gemm(sums, a, self.packed, k, self._slab_width(), False, True, cols)
            d = PermutedD(sums[k:], perm)
            self.pool.give([b for b in [*self._kept_bufs, self.bufs[True]] if b is not None])
        self.bufs, self.est, self.packed, self.kept, self._kept_bufs, self.sums = {}, None, None, [], [], None
        sums[k:].mul_(2.0 / max(self.n_d, 1))
        return sums[:k], d

    def _keep(self, a: torch.Tensor) -> None:
        """Keep chunk ``a`` (the ``[X | ΔX]`` staging buffer's rows) for D, the buffer replaced
        by a new one; past :data:`DEFER_BUDGET` x the sums' bytes, add every kept chunk's D in
        full now (the same sums, in the same order) and stop deferring."""
        kept = sum(t.nbytes for t in self.kept) + a.nbytes
        if kept <= DEFER_BUDGET * self.sums.nbytes:
            b = self.bufs[True]
            self.kept.append(a)
            self._kept_bufs.append(b)
            # A new staging buffer, unless this is result()'s last flush.
            self.bufs[True] = None if self._final else self.pool.take(b.shape, b.dtype, b.device)
            return
        for t in [*self.kept, a]:
            self._gemm(self.sums, t, self.packed, self.k, self._slab_width(), False, False)
        # Freed, not pooled: a width that does not fit keeps summing D whole from now on (and
        # would in the next block), so the pool would hold them for nothing.
        self.kept, self._kept_bufs, self.defer = [], [], False


class ChunkPool:
    """Staging buffers handed on from one :class:`HessianAccumulator` to the next (the GPTQ pass
    gives one pool to all its accumulators). A deferred D keeps its chunks in buffers of the
    same size block after block; mapped afresh each time, their page faults cost as much as a
    third of what the deferral saves (Qwen2.5-0.5B's shape, 32 windows: staging 1.0 -> 8.4 s).
    The block runner's reusing allocator was installed and did not serve them: its bounded cache
    goes to whatever the block frees (activations), so these buffers are owned here instead.
    Holds at most the buffers the widest deferring accumulator kept, until the pool is dropped."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        """A buffer of this shape, dtype and device (a returned one if any)."""
        free = self._free.get((torch.Size(shape), dtype, torch.device(device or "cpu")))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, bufs: list[torch.Tensor]) -> None:
        """Return buffers for later :meth:`take` calls."""
        for b in bufs:
            self._free.setdefault((b.shape, b.dtype, b.device), []).append(b)


_OptTensor = torch.Tensor | None


def _cpp_gemm(k: int, device: torch.device) -> Any:
    """The C++ extension's ``hessian_gemm`` (bf16 products summed in fp32, straight into the
    sums) when it is loaded, the sums are on the CPU, the CPU has AVX512-BF16 and ``K`` is a
    multiple of 16; else None (torch's bf16 GEMM with the expectation subtracted). Never
    builds the extension."""
    from qqq_compile.targets.w4a8.kernels.cpu import cpu_has_bf16, loaded_extension

    ext = loaded_extension()
    if ext is None or device.type != "cpu" or k % 16 or not cpu_has_bf16():
        return None
    return ext.hessian_gemm


def _cpp_stage(buf: torch.Tensor, x: _OptTensor, q: _OptTensor, scale: _OptTensor, xf: _OptTensor) -> Any:
    """The C++ extension's ``hessian_stage`` when it is loaded and takes these tensors (CPU,
    contiguous, fp32 ``x`` or int8 ``q`` with fp32 scales, fp32 or bf16 ``xf``), else None
    (torch's ops, the same values). Never builds the extension."""
    from qqq_compile.targets.w4a8.kernels.cpu import loaded_extension

    ext = loaded_extension()
    parts = [t for t in (buf, x, q, scale, xf) if t is not None]
    if ext is None or any(t.device.type != "cpu" or not t.is_contiguous() for t in parts):
        return None
    if (x is not None and x.dtype != torch.float32) or (q is not None and q.dtype != torch.int8):
        return None
    if scale is not None and scale.dtype != torch.float32:
        return None
    if xf is not None and xf.dtype not in (torch.float32, torch.bfloat16):
        return None
    return ext.hessian_stage


def _upper_inverse_cholesky(
    h: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, damp: float, retries: int
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H_perm + λI)^-1`` (``Uᵀ U = (H_perm + λI)^-1``),
    raising λ 10x per failure.

    ``H_perm`` is ``h`` with rows and columns permuted by ``perm`` and ``1`` on the
    diagonal of dead inputs. With ``J`` the order reversal, ``U = J L⁻¹ J`` where ``L`` is the
    lower Cholesky factor of ``J H_perm J``: one factorisation and one triangular inverse,
    half the arithmetic of inverting ``H`` and factoring the inverse (K = 4864: 1.35 → 0.89
    s). The Cholesky factor is unique, so ``U`` is the same matrix up to rounding (closer to
    float64's than before). At most two ``K x K`` buffers are alive at once; a retry re-reads
    ``h``, which is never written.
    """
    k = h.shape[0]
    rev = perm.flip(0)  # J H_perm J is h permuted by the reversed order
    dead_rev = dead.flip(0)
    a = None
    buf = torch.empty_like(h, dtype=torch.float32)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(retries + 1):
        rel = damp * 10**attempt
        a = _permuted(h, rev, out=a)
        a.diagonal()[dead_rev] = 1.0
        a.diagonal().add_(rel * a.diagonal().mean().item())
        _, err = torch.linalg.cholesky_ex(a, out=(buf, info))
        if int(err) != 0:
            continue
        # U = J L⁻¹ J, by column tiles of L⁻¹ (lower triangular: tile J's columns are zero
        # above its first row, so it solves only the trailing part of L), each written
        # flipped into its place in U (``a``; ``buf`` holds L until the last tile).
        a.zero_()
        for j0 in range(0, k, U_TILE):
            j1 = min(j0 + U_TILE, k)
            eye = torch.eye(k - j0, j1 - j0, device=h.device)
            a[: k - j0, k - j1 : k - j0] = torch.linalg.solve_triangular(buf[j0:, j0:], eye, upper=False).flip(0, 1)
        if _all_finite(a):
            return a, rel, attempt
    raise GPTQError(f"Cholesky failed even with damping {rel:g} x mean diag(H)")


def _all_finite(m: torch.Tensor) -> bool:
    """``torch.isfinite(m).all()`` without its 1.75 x ``m`` of temporaries: max and min
    propagate NaN, and are infinite exactly when some entry is."""
    return bool(torch.isfinite(m.amax())) and bool(torch.isfinite(m.amin()))


def _permuted(m: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``m[perm][:, perm]`` in float32 with one ``K x K`` allocation (``out`` reused if given)."""
    if out is None:
        out = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    # Row slabs: the gather's transient stays small. Columns by advanced indexing, not
    # index_select(1, ...), which copied column by column (K = 4864: 82 -> 36 ms).
    slab = torch.empty(min(256, m.shape[0]), m.shape[1], dtype=m.dtype, device=m.device)
    for i in range(0, m.shape[0], 256):
        rows = perm[i : i + 256]
        out[i : i + 256] = torch.index_select(m, 0, rows, out=slab[: rows.shape[0]])[:, perm]
    return out


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    max_retries: int = MAX_RETRIES,
    dxx: torch.Tensor | PermutedD | None = None,
    alpha: float = 0.25,
) -> GPTQResult:
    """Quantize ``w`` ``[N, K]`` against Hessian ``h`` ``[K, K]`` onto ``grid``.

    ``dxx`` ``[K, K]``: GPTAQ's ``2/n · (X - X̃)ᵀ X̃`` (same normalisation as ``h``),
    scaled by ``alpha``, or a :class:`PermutedD` (already in the solve's order; consumed);
    None: plain GPTQ. ``w``, ``h`` and a plain ``dxx`` are not modified. Dead inputs
    (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column, as in the reference.
    """
    d = dxx.d if isinstance(dxx, PermutedD) else dxx
    if not _all_finite(h) or (d is not None and not _all_finite(d)):
        raise GPTQError("the Hessian contains NaN/Inf (non-finite calibration activations)")
    kernel = _cpp_column_loop(w, grid)
    if kernel is not None:  # the column loop in C++: torch's remaining ops are large, keep the threads
        return _gptq(w, h, grid, damp, block_size, act_order, max_retries, dxx, alpha, kernel)
    with single_thread():
        return _gptq(w, h, grid, damp, block_size, act_order, max_retries, dxx, alpha, None)


def _cpp_column_loop(w: torch.Tensor, grid: Grid) -> Any:
    """The C++ extension's ``gptq_block`` when it is loaded, ``w`` is on the CPU and the grid
    gives its value table (``value_table()``), else None (the torch loop). Never builds the
    extension."""
    from qqq_compile.targets.w4a8.kernels.cpu import loaded_extension

    ext = loaded_extension()
    if ext is None or w.device.type != "cpu" or not hasattr(grid, "value_table"):
        return None
    return ext.gptq_block


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside: the column loop (and the clip search) run thousands
    of small ops, and with more than one thread their synchronisation costs far more than
    the arithmetic (100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    damp: float,
    block_size: int,
    act_order: bool,
    max_retries: int,
    dxx: torch.Tensor | None,
    alpha: float,
    kernel: Any,
) -> GPTQResult:
    n, k = w.shape
    dead = torch.diagonal(h) == 0
    perm = solve_permutation(h, act_order)
    if isinstance(dxx, PermutedD) and not torch.equal(dxx.perm, perm):
        raise ValueError("GPTAQ's D was accumulated in another column order than this solve's (act_order?)")
    dead_p = dead[perm]
    w = w.float()[:, perm]  # a copy: the solve updates it in place
    w[:, dead_p] = 0.0
    groups_t = grid.col_group()[perm].contiguous()
    table, qmin = grid.value_table() if kernel is not None else (None, 0)
    loop = kernel if kernel is not None else functools.partial(_column_loop, grid)
    hinv, used, retries = _upper_inverse_cholesky(h, perm, dead_p, damp, max_retries)
    p = None
    if dxx is not None:
        p = dxx.d if isinstance(dxx, PermutedD) else _permuted(dxx, perm)
        p[:, dead_p] = 0.0
        p = _gptaq_p(p, hinv).mul_(alpha)
    q_out = torch.empty(n, k, device=w.device)
    deq = torch.empty(n, k, device=w.device)
    row_loss = torch.zeros(n, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # a view: updates land in w
        hinv1 = hinv[i1:i2, i1:i2]
        p1 = None if p is None else p[i1:i2, i1:i2]
        err1 = torch.empty(n, i2 - i1, device=w.device)
        loop(w1, hinv1, p1, table, groups_t[i1:i2], qmin, q_out[:, i1:i2], deq[:, i1:i2], err1)
        row_loss += err1.pow(2).sum(dim=1) / 2
        # ... and, lazily (GPTQ's batched update), over all columns after the block.
        if i2 < k:  # in place: no [N, K - i2] product and no second pass over it
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
            if p is not None:
                w[:, i2:].addmm_(w1, p[i1:i2, i2:])  # w1: the block's unquantized columns
    inv = torch.argsort(perm)
    return GPTQResult(
        q_out[:, inv].to(torch.int8).contiguous(),
        deq[:, inv].contiguous(),
        row_loss,
        used,
        retries,
        int(dead.sum()),
    )


def _gptaq_p(d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """GPTAQ's ``P = triu₁(D Uᵀ) U`` for an upper-triangular ``U``, written over ``d``; at most
    one more ``K x K`` buffer.

    Only the upper triangle of either product can be nonzero (``triu₁(·)`` is strictly upper
    and ``U`` is upper), so only the tiles on or above the diagonal are
    multiplied: ``triu₁(D Uᵀ)[:, J] = D[:j1, J:] U[J, J:]ᵀ`` and
    ``P[:, J] = T[:j1, :j1] U[:j1, J]`` for each column tile ``J`` ending at ``j1``. That is
    K³/2 multiply-adds instead of 2K³: at K = 576 / 896 / 1536 / 4864 (Qwen2.5-0.5B's
    down_proj) 4.2 / 14.9 / 75 / 2339 ms became 2.6 / 6.9 / 30 / 729 ms (2 threads). Entries
    below the diagonal come out exactly zero either way."""
    k = d.shape[0]
    t = torch.zeros_like(d)
    for j0 in range(0, k, P_TILE):
        j1 = min(j0 + P_TILE, k)
        t[:j1, j0:j1] = torch.mm(d[:j1, j0:], u[j0:j1, j0:].t())
    t.triu_(diagonal=1)
    d.zero_()  # D is no longer needed: P goes into its buffer
    for j0 in range(0, k, P_TILE):
        j1 = min(j0 + P_TILE, k)
        d[:j1, j0:j1] = torch.mm(t[:j1, :j1], u[:j1, j0:j1])
    return d


def _column_loop(
    grid: Grid,
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    p1: torch.Tensor | None,
    table: torch.Tensor | None,
    groups: torch.Tensor,
    qmin: int,
    q_out: torch.Tensor,
    deq: torch.Tensor,
    err1: torch.Tensor,
) -> None:
    """GPTQ's column loop over one block ``w1`` ``[N, B]`` in torch ops (the C++ extension's
    ``gptq_block`` when loaded; same arguments, ``table`` and ``qmin`` unused here): writes
    codes, decoded values and scaled errors per column, updating the block's later columns."""
    for i, g in enumerate(groups.tolist()):
        col = w1[:, i]  # updates below touch only later columns: col keeps its value
        q, dq = grid.quantize(col, g)
        q_out[:, i] = q
        deq[:, i] = dq
        e = (col - dq) / hinv1[i, i]
        # Spread this column's error over the block's later columns.
        w1[:, i + 1 :].addr_(e, hinv1[i, i + 1 :], alpha=-1.0)
        if p1 is not None:
            w1[:, i + 1 :].addr_(col, p1[i, i + 1 :])
        err1[:, i] = e
