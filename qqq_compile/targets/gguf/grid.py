"""The Q4_0 grid GPTQ, the clip search and round-to-nearest work on: the exact values a
llama.cpp Q4_0 block can decode to, with its fp16 scales fixed up front.

Each row and block of 32 columns has one fp16 scale ``d`` and 16 values ``d · (q − 8)``,
``q`` in 0..15: eight steps on one side of zero, seven on the other. Which side is the long
one is the sign of ``d``. llama.cpp's quantizer takes ``d = max / −8`` (``max``: the signed
value of largest magnitude, which then maps to code 0 exactly); that is the absmax rule
here (:func:`absmax_scales`). The clip search (:func:`search_scales`) tries, per row and
block, ``d`` shrunk by each ratio on *both* sides (``r · max / −8``: the extreme on the
eight-step side; ``r · max / 7``: on the seven-step side) and keeps the fp16 ``d`` with the
least (optionally per-column weighted) squared rounding error, measured on the fp16 ``d``
itself, so what is exported is what was optimised. The absmax scale is the first candidate
and wins ties: the search never does worse than absmax on the metric it minimises.
"""

from __future__ import annotations

import math

import torch

from qqq_compile.targets.gguf.formats import QK, PackedQ4_0, check_blocks
from qqq_compile.targets.registry import ClipSearch

QMAX = 15  # codes 0..15
ZERO = 8  # code of the value 0


def _blocks(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, check_blocks(k), QK)


def signed_absmax(w: torch.Tensor) -> torch.Tensor:
    """``[N, B]``: per row and block, the value of largest magnitude, with its sign (the
    first one in a tie, as llama.cpp's loop keeps it)."""
    wb = _blocks(w.float())
    idx = wb.abs().argmax(dim=2, keepdim=True)  # first maximal index, like the C loop's strict <
    return wb.gather(2, idx)[..., 0]


def _round(wb: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and decoded values of blocks ``wb`` ``[N, B, 32]`` on fp16 scales ``d`` ``[N, B]``
    (float32 holding fp16 values): nearest value ``d · (q − 8)``, ``q`` clamped to 0..15."""
    df = d[..., None]
    safe = torch.where(df == 0, torch.ones_like(df), df)
    q = torch.round(wb / safe).add_(ZERO).clamp_(0, QMAX)
    q = torch.where(df == 0, torch.full_like(q, ZERO), q)
    return q, (q - ZERO) * df


def absmax_scales(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's scales ``fp16(max / −8)`` ``[N, B]`` (float16)."""
    return (signed_absmax(w) / -8).to(torch.float16)


def search_scales(w: torch.Tensor, clip: ClipSearch, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped fp16 scales ``[N, B]`` minimising ``Σ_k c_k (w_k − ŵ_k)²`` per row and block.

    Candidates: for each ratio ``r`` of ``clip``, ``r · max / −8`` and ``r · max / 7``
    (both signs), rounded to fp16. ``col_weight`` ``[K]`` (``c_k``, e.g. ``diag(H)``);
    None: plain MSE.
    """
    w = w.float()
    n, k = w.shape
    wb = _blocks(w)
    c = torch.ones(k, device=w.device) if col_weight is None else col_weight.float().clamp_min(0)
    cb = c.reshape(1, k // QK, QK)
    mx = signed_absmax(w)
    best_e, best_d = None, None
    for r in clip.ratios():
        for cand in (r * mx / -8, r * mx / 7):
            d = cand.to(torch.float16)
            _, deq = _round(wb, d.float())
            e = deq.sub_(wb).square_().mul_(cb).sum(dim=2)
            if best_e is None:
                best_e, best_d = e, d
            else:
                better = e < best_e  # strict: ties keep the earlier (absmax first)
                best_e, best_d = torch.where(better, e, best_e), torch.where(better, d, best_d)
    return best_d.contiguous()


class Q4_0Grid:
    """The Q4_0 values of one weight ``[N, K]`` with its fp16 block scales fixed (absmax, or
    searched with ``clip``, weighting columns by ``col_weight``).

    ``quantize(col, g)`` returns the codes (0..15, float) and their exact decoded values
    (bit-identical to :meth:`PackedQ4_0.dequantize`); ``quantize_all`` does every column;
    ``pack`` makes the :class:`PackedQ4_0` of codes (of rows ``rows``).
    """

    def __init__(
        self, w: torch.Tensor, *, clip: ClipSearch | None = None, col_weight: torch.Tensor | None = None
    ) -> None:
        n, k = w.shape
        self.k, self.group_size = k, QK
        check_blocks(k)
        self.d = absmax_scales(w) if clip is None else search_scales(w, clip, col_weight)  # fp16 [N, B]
        self._df = self.d.float()
        self._safe = torch.where(self._df == 0, torch.ones_like(self._df), self._df)

    def col_group(self) -> torch.Tensor:
        return torch.arange(self.k, device=self.d.device) // QK

    def quantize(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (float, 0..15) and decoded values of one column ``[N]`` in block ``g``."""
        d = self._df[:, g]
        q = torch.div(col.float(), self._safe[:, g]).round_().add_(ZERO).clamp_(0, QMAX)
        q = torch.where(d == 0, ZERO, q)
        return q, (q - ZERO) * d

    def value_table(self) -> tuple[torch.Tensor, int]:
        """``(table, 0)``: ``table[g, n, c]`` (float32 ``[G, N, 16]``) is the decoded value of code
        ``c`` in block ``g`` of row ``n``; a zero-scale block allows only code 8 (+inf elsewhere),
        as :meth:`quantize` gives. GPTQ's C++ column loop rounds to the nearest entry."""
        codes = torch.arange(QMAX + 1, dtype=torch.float32, device=self.d.device) - ZERO
        d = self._df.t()[:, :, None]  # [G, N, 1]
        table = codes * d
        only_zero = torch.where(codes == 0, 0.0, math.inf).expand_as(table)
        return torch.where(d == 0, only_zero, table).contiguous(), 0

    def quantize_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest of a whole weight ``[N, K]``: codes (int8, 0..15) and decoded values."""
        n, k = w.shape
        q, deq = _round(_blocks(w.float()), self._df)
        return q.reshape(n, k).to(torch.int8), deq.reshape(n, k)

    def pack(self, q4: torch.Tensor, rows: slice = slice(None)) -> PackedQ4_0:
        return PackedQ4_0.from_codes(q4.to(torch.int16), self.d[rows])


__all__ = ["Q4_0Grid", "absmax_scales", "search_scales", "signed_absmax"]
