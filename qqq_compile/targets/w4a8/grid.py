"""The values a packed W4 format can represent, and how its scales are chosen.

Shared by ``gptq`` and ``quantize_rtn`` (passes never import each other). A
:class:`Grid` holds the *final* scales of a weight (``channel_scale`` and, for the
two-level group formats, the int8 or fp16 ``group_scale``), so a value rounded onto it
is exactly what the packed weight decodes to: nothing is re-rounded at packing time.

Scales come from the absmax rule (:func:`absmax_scales`, what ``formats.choose_scales``
gives) or from a clipping search (:func:`search_scales`): every row (and group) tries
steps shrunk from absmax and keeps the one with the least (optionally per-column
weighted) squared error, evaluated on the format itself: the per-channel step, the int8
group multipliers ``m · s_ch`` (``m`` in 1..16, with ``s_ch`` searched too), or fp16 group scales over a fixed
``s_ch``. The absmax scales are always among the candidates and win ties, so the search
never has a larger error than absmax on the metric it minimises.
"""

from __future__ import annotations

import math

import torch

from qqq_compile.targets.registry import ClipSearch
from qqq_compile.targets.w4a8.formats import (
    ACT_QMAX,
    CHANNEL_QMAX,
    GROUP_QMAX,
    GROUP_QMIN,
    GROUP_SCALE_MAX,
    GroupScaleDtype,
    PackedW4,
    build_w8,
    choose_scales,
    expand_groups,
    group_absmax,
    num_groups,
    pack_int4,
)


def absmax_scales(w: torch.Tensor, group_size: int, dtype: GroupScaleDtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(channel_scale [N], group_scale [N, G] | None)`` from the absmax rule."""
    n, k = w.shape
    scales = choose_scales(w, group_size, dtype)
    if group_size <= 0 or dtype == "int8":
        # Scales of these formats do not depend on the codes: read them off a packing.
        ref = PackedW4.from_int4(torch.zeros(n, k, dtype=torch.int8, device=w.device), scales, dtype)
        return ref.channel_scale, ref.group_scale
    # QQQ's fp16 two-level format: one int8 quantizer per row over the group-dequantized
    # weight. Fixed up front (±7 steps of the widest group map to ±127) so that every
    # code's decoded value is known before any column is rounded.
    s_ch = (scales.step.amax(dim=1) * GROUP_QMAX / ACT_QMAX).float().clamp_min(1e-12)
    return s_ch, (scales.step / s_ch[:, None]).to(torch.float16)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` ``[N, K]`` as ``[N, G, size]`` (zero-padded: a zero rounds to zero exactly)."""
    n, k = w.shape
    size = k if group_size <= 0 else group_size
    g = num_groups(k, group_size)
    return torch.nn.functional.pad(w, (0, g * size - k)).view(n, g, size)


def _err(
    w3: torch.Tensor,
    wt3: torch.Tensor,
    step: torch.Tensor,
    qmin: int,
    qmax: int,
    fp16: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted squared rounding error per row and group ``[N, G]`` for steps ``[N, G]``.
    ``fp16``: ``(s_ch [N], gs [N, G])``, decoded as ``s_ch · round(q · gs)`` like the
    kernel (rounding to nearest step, a close proxy of the Grid's nearest decoded value)."""
    q = torch.div(w3, step[..., None]).round_().clamp_(qmin, qmax)
    if fp16 is None:
        deq = q.mul_(step[..., None])
    else:
        s_ch, gs = fp16
        # The Grid never picks a code whose q · gs needs clamping (-8 when 8 · gs > 127).
        q = torch.maximum(q, torch.where(torch.round(-qmin * gs) <= ACT_QMAX, qmin, qmin + 1)[..., None])
        deq = q.mul_(gs[..., None]).round_().mul_(s_ch[:, None, None])
    return deq.sub_(w3).square_().mul_(wt3).sum(dim=-1)


#: Rows of the clip search per pass, in elements of the weight: each candidate makes ~8
#: elementwise passes over its rows, which then stay in cache (Qwen2.5-0.5B's fused gate/up,
#: 9728 x 896: 1.11 s on one thread in one piece, 0.16 s in 1 M-element row chunks on two).
SEARCH_CHUNK = 1 << 20


def search_scales(
    w: torch.Tensor,
    group_size: int,
    dtype: GroupScaleDtype,
    clip: ClipSearch,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped scales minimising ``Σ_k c_k (w_k - ŵ_k)²`` per row / group on the format.

    ``col_weight`` ``[K]`` (``c_k``, e.g. ``diag(H)``); None: plain MSE. Returns the same
    pair as :func:`absmax_scales`. Rows are searched independently, in chunks of about
    ``SEARCH_CHUNK`` elements (the same result as in one piece, bit for bit).
    """
    rows = max(1, SEARCH_CHUNK // max(1, w.shape[1]))
    if w.shape[0] <= rows:
        return _search_rows(w, group_size, dtype, clip, col_weight)
    parts = [_search_rows(w[i : i + rows], group_size, dtype, clip, col_weight) for i in range(0, w.shape[0], rows)]
    gs = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return torch.cat([p[0] for p in parts]), gs


def _search_rows(
    w: torch.Tensor,
    group_size: int,
    dtype: GroupScaleDtype,
    clip: ClipSearch,
    col_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = w.float()
    n, k = w.shape
    c = torch.ones(k, device=w.device) if col_weight is None else col_weight.float().clamp_min(0)
    w3, wt3 = _grouped(w, group_size), _grouped(c[None, :], group_size)[0]
    amax = group_absmax(w, group_size).clamp_min(1e-8)  # [N, G], the clamp of choose_scales
    ratios = clip.ratios()
    if group_size <= 0:
        best, step = None, None
        for r in ratios:
            cand = r * amax / CHANNEL_QMAX
            e = _err(w3, wt3, cand, -CHANNEL_QMAX, CHANNEL_QMAX)
            if best is None:
                best, step = e, cand
            else:
                better = e < best  # strict: ties keep the larger step (absmax first)
                best, step = torch.where(better, e, best), torch.where(better, cand, step)
        return (step[:, 0] / 16).contiguous(), None
    sg = amax / GROUP_QMAX
    if dtype == "int8":
        return _search_int8(w3, wt3, sg, ratios, clip.min_ratio)
    s_ch = (sg.amax(dim=1) * GROUP_QMAX / ACT_QMAX).float().clamp_min(1e-12)
    best, gs = None, None
    for r in ratios:
        # The channel scale stays the absmax one: fp16 group scales are fine-grained
        # enough that only each group's own ratio matters.
        cand = (r * sg / s_ch[:, None]).to(torch.float16)
        e = _err(w3, wt3, s_ch[:, None] * cand.float(), GROUP_QMIN, GROUP_QMAX, (s_ch, cand.float()))
        if best is None:
            best, gs = e, cand
        else:
            better = e < best
            best, gs = torch.where(better, e, best), torch.where(better, cand, gs)
    return s_ch, gs.contiguous()


def _search_int8(
    w3: torch.Tensor, wt3: torch.Tensor, sg: torch.Tensor, ratios: list[float], min_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 two-level scales ``s_ch · m`` (``m`` integer in 1..16). First each group's best
    ratio on an ideal (continuous) step; then each row tries channel scales ``ρ · s0`` and
    every group the two multipliers around its best step (and, at ``ρ = 1``, its absmax
    one), keeping the row's best. (An exhaustive ``ρ × m`` window search cost 3x more
    time for under 0.1% less error on heavy-tailed test weights.)"""
    best_e, best_r = None, None
    for r in ratios:
        e = _err(w3, wt3, r * sg, GROUP_QMIN, GROUP_QMAX)
        if best_e is None:
            best_e, best_r = e, torch.full_like(e, r)
        else:
            better = e < best_e
            best_e, best_r = torch.where(better, e, best_e), torch.where(better, r, best_r)
    target = best_r * sg  # [N, G]: each group's preferred step
    s0 = sg.amax(dim=1) / GROUP_SCALE_MAX
    best_row, best_s, best_m = None, None, None
    for i, rho in enumerate(ratios):
        s_ch = rho * s0
        t = target / s_ch[:, None]
        m_lo = torch.ceil(min_ratio * sg / s_ch[:, None] - 1e-4)  # no group shrinks below min_ratio
        cands = [torch.maximum(t.floor(), m_lo), torch.maximum(t.ceil(), m_lo)]
        if i == 0:  # ρ = 1: the absmax multipliers, so the search never loses to absmax
            cands.insert(0, torch.ceil(sg / s_ch[:, None] - 1e-4))
        g_err, g_m = None, None
        for m in cands:
            m = m.clamp(1, GROUP_SCALE_MAX)
            e = _err(w3, wt3, s_ch[:, None] * m, GROUP_QMIN, GROUP_QMAX)
            if g_err is None:
                g_err, g_m = e, m
            else:
                better = e < g_err
                g_err, g_m = torch.where(better, e, g_err), torch.where(better, m, g_m)
        row = g_err.sum(dim=1)
        if best_row is None:
            best_row, best_s, best_m = row, s_ch, g_m
        else:
            better = row < best_row
            best_row = torch.where(better, row, best_row)
            best_s = torch.where(better, s_ch, best_s)
            best_m = torch.where(better[:, None], g_m, best_m)
    return best_s.float().contiguous(), best_m.to(torch.int8).contiguous()


class Grid:
    """The values a packed W4 format can represent, per row and group.

    Built from static scales of the whole weight (original column order), so act-order
    never scrambles groups; ``clip`` searches them instead of taking absmax (with
    ``col_weight`` ``[K]`` weighting each column's error). ``quantize(col, g)`` returns
    the int4 codes and their exact decoded values (bit-identical to
    ``PackedW4.dequantize``); ``quantize_all`` does every column at once.
    """

    def __init__(
        self,
        w: torch.Tensor,
        group_size: int,
        dtype: GroupScaleDtype,
        *,
        clip: ClipSearch | None = None,
        col_weight: torch.Tensor | None = None,
    ):
        n, k = w.shape
        self.k, self.group_size, self.dtype = k, group_size, dtype
        w = w.float()
        if clip is None:
            self.s_ch, self.gs = absmax_scales(w, group_size, dtype)
        else:
            self.s_ch, self.gs = search_scales(w, group_size, dtype, clip, col_weight)
        if self.gs is None:
            self.qmin, self.qmax = -CHANNEL_QMAX, CHANNEL_QMAX
            self.step = (self.s_ch * 16)[:, None]  # exact: W8 = q4 << 4
        else:
            self.qmin, self.qmax = GROUP_QMIN, GROUP_QMAX
            self.step = self.s_ch[:, None] * self.gs.float()  # [N, G]
        self.table: torch.Tensor | None = None
        if self.gs is not None and dtype == "float16":
            codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32, device=w.device)
            w8 = torch.round(codes[None, None, :] * self.gs.float().t()[:, :, None])
            # Codes whose q4 * gs would need clamping to ±127 (q4 = -8 in the widest groups)
            # are never chosen: clamping only duplicates -7's value, and a kernel that got
            # the clamp wrong would then still decode every weight right.
            self.table = torch.where(w8.abs() <= ACT_QMAX, self.s_ch[None, :, None] * w8, math.inf)  # [G, N, 16]

    def col_group(self) -> torch.Tensor:
        idx = torch.arange(self.k, device=self.s_ch.device)
        return idx // self.group_size if self.group_size > 0 else torch.zeros_like(idx)

    def quantize(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (float, integral) and decoded values of one column ``[N]`` in group ``g``."""
        if self.table is not None:
            t = self.table[g]
            idx = (col[:, None] - t).abs().argmin(dim=1, keepdim=True)
            return (idx[:, 0] + self.qmin).float(), t.gather(1, idx)[:, 0]
        q = torch.clamp(torch.round(col / self.step[:, g]), self.qmin, self.qmax)
        w8 = build_w8(q, None if self.gs is None else self.gs[:, g])  # exact small integers
        return q, self.s_ch * w8

    def value_table(self) -> tuple[torch.Tensor, int]:
        """``(table, qmin)``: ``table[g, n, c]`` (float32 ``[G, N, C]``) is the decoded value of
        code ``qmin + c`` in group ``g`` of row ``n`` (+inf: a code never chosen).
        :meth:`quantize` rounds to the nearest entry (GPTQ's C++ column loop reads it)."""
        if self.table is not None:
            return self.table.contiguous(), self.qmin
        codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32, device=self.s_ch.device)
        gs = None if self.gs is None else self.gs.t()[:, :, None]  # [G, N, 1]
        w8 = build_w8(codes[None, None, :], gs)
        return (self.s_ch[None, :, None] * w8).contiguous(), self.qmin

    def quantize_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest of a whole weight ``[N, K]``: int4 codes (int8) and decoded
        values, the same as :meth:`quantize` column by column."""
        w = w.float()
        n, k = w.shape
        if self.table is not None:
            q = torch.empty(n, k, device=w.device)
            deq = torch.empty(n, k, device=w.device)
            for g in range(self.table.shape[0]):
                cols = slice(g * self.group_size, min((g + 1) * self.group_size, k))
                t = self.table[g]  # [N, 16]
                idx = (w[:, cols, None] - t[:, None, :]).abs().argmin(dim=2)
                q[:, cols] = (idx + self.qmin).float()
                deq[:, cols] = t.gather(1, idx)
            return q.to(torch.int8), deq
        step = expand_groups(self.step, k, self.group_size) if self.gs is not None else self.step
        q = torch.clamp(torch.round(w / step), self.qmin, self.qmax)
        gs = None if self.gs is None else expand_groups(self.gs, k, self.group_size)
        return q.to(torch.int8), self.s_ch[:, None] * build_w8(q, gs)

    def pack(self, q4: torch.Tensor, rows: slice = slice(None)) -> PackedW4:
        gs = None if self.gs is None else self.gs[rows].contiguous()
        return PackedW4(pack_int4(q4), self.s_ch[rows].contiguous(), gs, self.k, self.group_size)
