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

from dataclasses import dataclass

import torch

from qqq_compile.targets.registry import Grid

MAX_RETRIES = 4  # damping grows 10x per retry: 1% → 10% → 100% → 1000% → 10000% of mean diag


class GPTQError(RuntimeError):
    """GPTQ could not quantize a linear (non-finite Hessian, Cholesky never succeeded)."""


@dataclass
class GPTQResult:
    q4: torch.Tensor  # int8 [N, K], original column order
    deq: torch.Tensor  # float32 [N, K]: exactly what the packed weight decodes to
    row_loss: torch.Tensor  # [N] GPTQ's loss sum (w - q)^2 / (2 [H^-1]_ii^2) per row
    damp: float  # relative damping that worked (fraction of mean diag(H))
    retries: int
    dead: int  # input channels with H_ii = 0 (weights zeroed)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + λI)^-1``, raising λ 10x per failure."""
    mean_diag = torch.diag(h).mean().item()
    for attempt in range(retries + 1):
        rel = damp * 10**attempt
        hd = h.clone()
        hd.diagonal().add_(rel * mean_diag)
        lower, err = torch.linalg.cholesky_ex(hd)
        if int(err) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, err = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(err) == 0 and torch.isfinite(upper).all():
                return upper, rel, attempt
    raise GPTQError(f"Cholesky failed even with damping {rel:g} x mean diag(H)")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    max_retries: int = MAX_RETRIES,
    dxx: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> GPTQResult:
    """Quantize ``w`` ``[N, K]`` against Hessian ``h`` ``[K, K]`` onto ``grid``.

    ``dxx`` ``[K, K]``: GPTAQ's ``2/n · (X - X̃)ᵀ X̃`` (same normalisation as ``h``),
    scaled by ``alpha``; None: plain GPTQ. ``w`` and ``h`` are not modified. Dead inputs
    (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column, as in the reference.
    """
    if not torch.isfinite(h).all() or (dxx is not None and not torch.isfinite(dxx).all()):
        raise GPTQError("the Hessian contains NaN/Inf (non-finite calibration activations)")
    threads = torch.get_num_threads()
    # The column loop runs thousands of small ops: with more than one thread their
    # synchronisation costs far more than the arithmetic (100x on a busy 2-core box).
    torch.set_num_threads(1)
    try:
        return _gptq(w, h, grid, damp, block_size, act_order, max_retries, dxx, alpha)
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
) -> GPTQResult:
    w = w.float().clone()
    h = h.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    w = w[:, perm].contiguous()
    h = h[perm][:, perm]
    groups = grid.col_group()[perm].tolist()
    hinv, used, retries = _upper_inverse_cholesky(h, damp, max_retries)
    del h
    p = None
    if dxx is not None:
        d = dxx.float().clone()
        d[:, dead] = 0.0
        d = d[perm][:, perm]
        p = (d @ hinv.t()).triu_(diagonal=1) @ hinv
        p.mul_(alpha)
        del d
    q_out = torch.empty(n, k)
    deq = torch.empty(n, k)
    row_loss = torch.zeros(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # a view: updates land in w
        hinv1 = hinv[i1:i2, i1:i2]
        p1 = None if p is None else p[i1:i2, i1:i2]
        err1 = torch.empty(n, i2 - i1)
        for i in range(i2 - i1):
            col = w1[:, i]  # updates below touch only later columns: col keeps its value
            q, dq = grid.quantize(col, groups[i1 + i])
            q_out[:, i1 + i] = q
            deq[:, i1 + i] = dq
            e = (col - dq) / hinv1[i, i]
            # Spread this column's error over the block's later columns.
            w1[:, i + 1 :].addr_(e, hinv1[i, i + 1 :], alpha=-1.0)
            if p1 is not None:
                w1[:, i + 1 :].addr_(col, p1[i, i + 1 :])
            err1[:, i] = e
        row_loss += err1.pow(2).sum(dim=1) / 2
        # ... and, lazily (GPTQ's batched update), over all columns after the block.
        if i2 < k:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
            if p is not None:
                w[:, i2:] += w1 @ p[i1:i2, i2:]  # w1: the block's unquantized columns
    inv = torch.argsort(perm)
    return GPTQResult(
        q_out[:, inv].to(torch.int8).contiguous(),
        deq[:, inv].contiguous(),
        row_loss,
        used,
        retries,
        int(dead.sum()),
    )
