"""Packed W4 weight formats: the one definition every other module imports.

A quantized linear ``y = x @ W.T + b`` with ``W`` of shape ``[N, K]`` is stored as

* ``qweight``  uint8 ``[N, ceil(K/2)]``: two signed int4 values per byte, the even
  column ``k`` in the low nibble and ``k+1`` in the high nibble (two's complement).
* ``channel_scale``  float32 ``[N]``: the per-output-channel scale ``s_ch``.
* ``group_scale`` (per-group formats only) ``[N, ceil(K/group_size)]``: the group
  scale *relative to* ``s_ch`` (QQQ's two-level scheme), either

  - ``int8`` small integers in ``[1, 16]`` (QServe-style): the kernel computes
    ``w8 = q4 * gs`` exactly, in ``[-128, 112]``;
  - ``float16`` (QQQ's own storage): ``w8 = round(q4 * gs)``, clamped to ``[-127, 127]``.

Every format reduces to an int8 matrix ``W8`` and ``W ≈ s_ch[:, None] * W8``, so the
kernels run one int8 GEMM and the epilogue multiplies by ``s_token * s_ch``.
Per-channel weights use int4 in ``[-7, 7]`` and ``W8 = q4 << 4`` (the 1/16 is folded
into ``s_ch``). Per-group weights use int4 in ``[-8, 7]``.

``K`` need not be a multiple of the group size: the last group is simply shorter
(SmolLM2's hidden size 576 = 4 full groups of 128 + one of 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from qqq_compile.targets.registry import register_format

GroupScaleDtype = Literal["int8", "float16"]

CHANNEL_QMAX = 7  # per-channel int4 range [-7, 7] so that q4 << 4 stays in int8
GROUP_QMIN, GROUP_QMAX = -8, 7
GROUP_SCALE_MAX = 16  # int8 two-level scales lie in [1, 16]: -8 * 16 = -128 fits int8
ACT_QMAX = 127  # per-token symmetric int8 activations use [-127, 127]


class FormatError(ValueError):
    """A tensor does not fit the packed W4 format (wrong dtype, shape or range)."""


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values (int8 tensor ``[N, K]`` in [-8, 7]) into uint8 ``[N, ceil(K/2)]``."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise FormatError(f"pack_int4 expects a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise FormatError("pack_int4: values must lie in [-8, 7]")
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = q.to(torch.uint8) & 0xF  # two's-complement nibble
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, ceil(K/2)]`` to int8 ``[N, K]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"unpack_int4 expects a 2-D uint8 tensor, got {packed.dtype}")
    if packed.shape[1] != (k + 1) // 2:
        raise FormatError(f"unpack_int4: {packed.shape[1]} bytes per row cannot hold K={k}")
    b = packed.view(torch.int8)
    lo = (b << 4) >> 4  # arithmetic shift sign-extends the low nibble
    hi = b >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)[:, :k].contiguous()


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(k / group_size)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Repeat per-group columns ``[N, G]`` to per-input-column ``[N, K]``."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``max |w|`` per row and group: ``[N, G]`` (``G = 1`` for per-channel)."""
    n, k = w.shape
    if group_size <= 0:
        return w.abs().amax(dim=1, keepdim=True)
    g = num_groups(k, group_size)
    pad = g * group_size - k
    wp = torch.nn.functional.pad(w.abs(), (0, pad))
    return wp.view(n, g, group_size).amax(dim=2)


@dataclass(frozen=True)
class WeightScales:
    """The scales a quantizer (RTN or GPTQ) rounds against.

    ``step`` ``[N, G]`` is the float quantization step each int4 value is multiplied by
    (``G = 1`` for per-channel). For the int8 two-level format ``step`` is already
    ``s_ch * gs`` exactly, so quantizing against it loses nothing more at packing time.
    """

    step: torch.Tensor
    group_size: int
    qmin: int
    qmax: int


def choose_scales(w: torch.Tensor, group_size: int = -1, group_scale_dtype: GroupScaleDtype = "int8") -> WeightScales:
    """Symmetric absmax scales for ``w`` ``[N, K]`` in the requested format."""
    w = w.float()
    amax = group_absmax(w, group_size).clamp_min(1e-8)
    if group_size <= 0:
        return WeightScales(amax / CHANNEL_QMAX, -1, -CHANNEL_QMAX, CHANNEL_QMAX)
    sg = amax / GROUP_QMAX
    if group_scale_dtype == "int8":
        s_ch, gs = _integer_two_level(sg)
        sg = s_ch[:, None] * gs.float()
    return WeightScales(sg, group_size, GROUP_QMIN, GROUP_QMAX)


def _integer_two_level(sg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The largest group of each row gets gs = 16; ceil (not round) so no group's
    # effective step shrinks below its absmax step, which would clip its outliers.
    s_ch = sg.amax(dim=1) / GROUP_SCALE_MAX
    gs = torch.ceil(sg / s_ch[:, None] - 1e-4).clamp(1, GROUP_SCALE_MAX)
    return s_ch, gs.to(torch.int8)


def build_w8(q4: torch.Tensor, gs: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 weight the kernels multiply: the one definition of the W8 build.

    ``q4``: int4 codes (int8, or float holding integers); ``gs``: two-level group scales
    broadcast to ``q4`` (None: per-channel). Per-channel: ``q4 << 4``; int8 scales:
    ``q4 * gs`` exactly; float16 scales: ``round(q4 * gs)`` clamped to ``[-127, 127]``.
    Integer codes give int8, float codes give float32 holding the same integers.
    """
    exact = not q4.is_floating_point()
    if gs is None:
        return q4 * 16 if exact else q4.float() * 16
    if gs.dtype == torch.int8:
        w8 = q4.to(torch.int16) * gs.to(torch.int16) if exact else q4.float() * gs.float()
    else:
        w8 = torch.round(q4.float() * gs.float()).clamp_(-ACT_QMAX, ACT_QMAX)
    return w8.to(torch.int8) if exact else w8.float()


def fake_quant_weight(
    w: torch.Tensor, group_size: int = -1, group_scale_dtype: GroupScaleDtype = "int8"
) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` ``[N, K]`` on the format's grid (the
    values of :func:`choose_scales` + :func:`quantize_to_int4` times the step), in ``w``'s
    dtype, with in-place ops: the smoothing search calls it for every candidate. (With
    float16 group scales the kernel also rounds ``q4 * gs`` to int8; that is not modelled.)"""
    wf = w.float()
    sc = choose_scales(wf, group_size, group_scale_dtype)
    step = expand_groups(sc.step, w.shape[1], group_size) if group_size > 0 else sc.step
    return torch.div(wf, step).round_().clamp_(sc.qmin, sc.qmax).mul_(step).to(w.dtype)


def quantize_to_int4(w: torch.Tensor, scales: WeightScales) -> torch.Tensor:
    """Round ``w`` ``[N, K]`` to int4 codes (int8 tensor) against ``scales``."""
    step = expand_groups(scales.step, w.shape[1], scales.group_size) if scales.group_size > 0 else scales.step
    return torch.clamp(torch.round(w.float() / step), scales.qmin, scales.qmax).to(torch.int8)


@register_format
@dataclass
class PackedW4:
    """A packed W4 weight; see the module docstring for the layout."""

    format: ClassVar[str] = "w4a8"

    qweight: torch.Tensor  # uint8 [N, ceil(K/2)]
    channel_scale: torch.Tensor  # float32 [N]
    group_scale: torch.Tensor | None  # int8 or float16 [N, G]; None for per-channel
    in_features: int
    group_size: int = -1

    def __post_init__(self) -> None:
        n = self.qweight.shape[0]
        if self.qweight.dtype != torch.uint8 or self.qweight.shape[1] != (self.in_features + 1) // 2:
            raise FormatError(f"qweight must be uint8 [N, ceil(K/2)] for K={self.in_features}")
        if self.channel_scale.shape != (n,):
            raise FormatError(f"channel_scale must have shape ({n},)")
        if (self.group_size > 0) != (self.group_scale is not None):
            raise FormatError("group_scale is required exactly when group_size > 0")
        if self.group_scale is not None:
            if self.group_scale.dtype not in (torch.int8, torch.float16):
                raise FormatError("group_scale must be int8 or float16")
            if self.group_scale.shape != (n, num_groups(self.in_features, self.group_size)):
                raise FormatError("group_scale has the wrong shape for (N, K, group_size)")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def group_scale_dtype(self) -> GroupScaleDtype | None:
        if self.group_scale is None:
            return None
        return "int8" if self.group_scale.dtype == torch.int8 else "float16"

    def int4(self) -> torch.Tensor:
        return unpack_int4(self.qweight, self.in_features)

    def int8_weight(self) -> torch.Tensor:
        """``W8`` ``[N, K]`` exactly as the kernels build it from the packed data."""
        gs = None if self.group_scale is None else expand_groups(self.group_scale, self.in_features, self.group_size)
        return build_w8(self.int4(), gs)

    def dequantize(self) -> torch.Tensor:
        return self.channel_scale[:, None] * self.int8_weight().float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "channel_scale": self.channel_scale}
        if self.group_scale is not None:
            out["group_scale"] = self.group_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def record(self) -> dict[str, Any]:
        """The facts an artifact stores next to :meth:`tensors` (see :meth:`from_record`)."""
        return {
            "bits": 4,
            "act_bits": 8,
            "group_size": self.group_size,
            "group_scale_dtype": self.group_scale_dtype,
            "bits_per_weight": self.bits_per_weight(),
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict[str, torch.Tensor], in_features: int) -> PackedW4:
        return cls(
            tensors["qweight"], tensors["channel_scale"], tensors.get("group_scale"), in_features, rec["group_size"]
        )

    @classmethod
    def from_int4(cls, q4: torch.Tensor, scales: WeightScales, group_scale_dtype: GroupScaleDtype = "int8") -> PackedW4:
        """Pack int4 codes that were rounded against ``scales`` (RTN or GPTQ output)."""
        k = q4.shape[1]
        if scales.group_size <= 0:
            return cls(pack_int4(q4), (scales.step[:, 0] / 16).float().contiguous(), None, k, -1)
        if group_scale_dtype == "int8":
            s_ch, gs = _integer_two_level(scales.step)
        else:
            # QQQ: a per-channel int8 quantizer over the dequantized weight, and the
            # group scales kept in fp16 relative to it.
            w_deq = q4.float() * expand_groups(scales.step, k, scales.group_size)
            s_ch = w_deq.abs().amax(dim=1).clamp_min(1e-8) / ACT_QMAX
            gs = (scales.step / s_ch[:, None]).to(torch.float16)
        return cls(pack_int4(q4), s_ch.float().contiguous(), gs.contiguous(), k, scales.group_size)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = -1, group_scale_dtype: GroupScaleDtype = "int8") -> PackedW4:
        """Round-to-nearest quantization of a float weight ``[N, K]``."""
        scales = choose_scales(w, group_size, group_scale_dtype)
        return cls.from_int4(quantize_to_int4(w, scales), scales, group_scale_dtype)


def act_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-token symmetric int8 step ``max|x| / 127`` (float32 ``[..., 1]``): the one
    definition of the activation quantizer's scale."""
    return x.float().abs().amax(dim=-1, keepdim=True).clamp_min_(1e-8).div_(ACT_QMAX)


def quantize_act_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8: ``x ≈ q * s`` with ``s`` ``[..., 1]`` float32."""
    s = act_scale(x)
    q = torch.div(x.float(), s).round_().clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8)
    return q, s


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize activations per token (calibration losses, GPTQ, smoothing):
    the values of :func:`quantize_act_per_token`, with in-place ops and no int8 copy."""
    s = act_scale(x)
    return torch.div(x.float(), s).round_().clamp_(-ACT_QMAX, ACT_QMAX).mul_(s).to(x.dtype)


# ----------------------------------------------------------------------------- int8 weights

WEIGHT8_QMAX = 127  # symmetric int8 weights use [-127, 127], like the activations


def quantize_int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8 per row: ``w ≈ q * s[:, None]``.

    ``w`` float ``[N, K]`` -> ``(q int8 [N, K], s float32 [N])``. Rows are output channels
    of a linear (the W8A8 ``qqq::w8a8_linear`` format) or the rows of an embedding table,
    which is the same thing for an lm_head tied to its embedding.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise FormatError(f"quantize_int8_per_row expects a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    wf = w.detach().float()
    s = wf.abs().amax(dim=1).clamp_min(1e-8) / WEIGHT8_QMAX
    q = torch.clamp(torch.round(wf / s[:, None]), -WEIGHT8_QMAX, WEIGHT8_QMAX).to(torch.int8)
    return q, s.contiguous()
