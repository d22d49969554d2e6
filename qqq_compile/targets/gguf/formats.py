"""llama.cpp's block formats Q4_0 and Q8_0, bit for bit: the one definition the GGUF
target's grid, kernels, head pass and writer import.

Both quantize rows in blocks of :data:`QK` = 32 values along ``K`` with one float16 scale
``d`` per block (``ggml-common.h``: ``block_q4_0``, ``block_q8_0``):

* **Q4_0** (weights): 4-bit codes ``q`` in 0..15 meaning ``d · (q − 8)``. A block is 18
  bytes: ``d``, then 16 bytes where byte ``j`` holds value ``j`` in its low nibble and
  value ``j + 16`` in its high nibble. Stored here as ``qs`` uint8 ``[N, K/2]`` (the 16
  bytes of each block in file order) and ``d`` float16 ``[N, K/32]``; the GGUF writer
  interleaves them. llama.cpp's own quantizer (``quantize_row_q4_0_ref``) takes
  ``d = max / −8`` with ``max`` the *signed* value of largest magnitude (so ``d`` may be
  negative and the extreme maps to code 0 exactly); our grids choose ``d`` themselves
  (:mod:`.grid`) and only the decode rule matters.
* **Q8_0** (activations, and the lm_head / embedding tables): int8 ``q`` meaning
  ``d · q``, ``d`` float16. A block is 34 bytes: ``d`` then 32 int8.

Activations: on CPU llama.cpp multiplies a Q4_0 (or Q8_0) weight by Q8_0 activations
(``type_traits_cpu[GGML_TYPE_Q4_0].vec_dot_type``): each row of ``x`` is quantized per block
of 32 by ``quantize_row_q8_0`` (x86 AVX path: ``amax`` per block, ``d = amax / 127``
stored as fp16, ``q = round_half_even(x · (127 / amax))`` in fp32; the fp32 ``127/amax``
multiplies, the fp16 ``d`` scales the dot product). :func:`quantize_act_q8_0` reproduces
that exactly; :func:`fake_quant_act` is its decoded value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qqq_compile.errors import QQQError
from qqq_compile.targets.registry import register_format

QK = 32  # values per block (QK4_0 = QK8_0 = 32)
Q4_BYTES = 18  # bytes per Q4_0 block: fp16 d + 16 bytes of nibbles
Q8_BYTES = 34  # bytes per Q8_0 block: fp16 d + 32 int8
Q8_MAX = 127


class BlockFormatError(QQQError, ValueError):
    """A tensor does not fit a llama.cpp block format (shape, dtype or code range)."""


def check_blocks(k: int, what: str = "K") -> int:
    """The number of blocks of 32 in ``k``; raises :class:`BlockFormatError` otherwise."""
    if k <= 0 or k % QK:
        raise BlockFormatError(
            f"{what}={k} is not a multiple of {QK}: llama.cpp's Q4_0 and Q8_0 store rows in blocks of {QK} values"
        )
    return k // QK


# ----------------------------------------------------------------------------- Q4_0 nibbles


def pack_q4_0(codes: torch.Tensor) -> torch.Tensor:
    """Codes (int tensor ``[N, K]`` in 0..15) to llama.cpp's nibble layout, uint8 ``[N, K/2]``:
    in each block of 32, byte ``j`` = code ``j`` | code ``j+16`` << 4."""
    if codes.dim() != 2 or codes.is_floating_point():
        raise BlockFormatError(f"pack_q4_0 expects 2-D integer codes, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    b = check_blocks(k)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise BlockFormatError("pack_q4_0: Q4_0 codes must lie in 0..15")
    c = codes.to(torch.uint8).view(n, b, 2, QK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, b * QK // 2).contiguous()


def unpack_q4_0(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_q4_0`: uint8 ``[N, K/2]`` to codes uint8 ``[N, K]`` in 0..15."""
    if qs.dtype != torch.uint8 or qs.dim() != 2 or qs.shape[1] % (QK // 2):
        raise BlockFormatError(f"unpack_q4_0 expects uint8 [N, K/2] with K a multiple of {QK}, got {qs.dtype}")
    n = qs.shape[0]
    b = qs.shape[1] // (QK // 2)
    q = qs.view(n, b, QK // 2)
    return torch.stack((q & 0xF, q >> 4), dim=2).reshape(n, b * QK)


def expand_blocks(d: torch.Tensor) -> torch.Tensor:
    """Per-block scales ``[..., B]`` to per-value ``[..., B*32]`` (float32)."""
    return d.float().repeat_interleave(QK, dim=-1)


def decode_q4_0(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``d · (q − 8)`` that Q4_0 blocks decode to (exact)."""
    return (unpack_q4_0(qs).to(torch.int8) - 8).float() * expand_blocks(d)


def decode_q8_0(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The float32 values ``d · q`` that Q8_0 blocks decode to (exact)."""
    return qs.float() * expand_blocks(d)


def _check_scales(d: torch.Tensor, n: int, b: int, fmt: str) -> None:
    if d.dtype != torch.float16 or tuple(d.shape) != (n, b):
        raise BlockFormatError(f"{fmt}: d must be float16 [{n}, {b}], got {d.dtype} {tuple(d.shape)}")


class _Blocks:
    """What Q4_0 and Q8_0 share: ``qs`` codes and fp16 ``d`` per block of 32, ``[N, K]``."""

    qs: torch.Tensor
    d: torch.Tensor
    in_features: int
    bits: ClassVar[int] = 0

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qs": self.qs, "d": self.d}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def record(self) -> dict[str, Any]:
        return {"bits": self.bits, "act_bits": 8, "group_size": QK, "bits_per_weight": self.bits_per_weight()}

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict[str, torch.Tensor], in_features: int) -> Any:
        return cls(tensors["qs"], tensors["d"], in_features)


@register_format
@dataclass
class PackedQ4_0(_Blocks):
    """A weight ``[N, K]`` in llama.cpp's Q4_0 (see the module docstring for the layout)."""

    format: ClassVar[str] = "q4_0"
    bits: ClassVar[int] = 4

    qs: torch.Tensor  # uint8 [N, K/2]
    d: torch.Tensor  # float16 [N, K/32]
    in_features: int

    def __post_init__(self) -> None:
        b = check_blocks(self.in_features, "in_features")
        if self.qs.dtype != torch.uint8 or self.qs.dim() != 2 or self.qs.shape[1] != self.in_features // 2:
            raise BlockFormatError(f"q4_0: qs must be uint8 [N, {self.in_features // 2}], got {tuple(self.qs.shape)}")
        _check_scales(self.d, self.qs.shape[0], b, "q4_0")

    def codes(self) -> torch.Tensor:
        """Codes ``[N, K]`` (uint8, 0..15)."""
        return unpack_q4_0(self.qs)

    def dequantize(self) -> torch.Tensor:
        return decode_q4_0(self.qs, self.d)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, d: torch.Tensor) -> PackedQ4_0:
        """Pack codes ``[N, K]`` (0..15) with their fp16 block scales ``[N, K/32]``."""
        return cls(pack_q4_0(codes), d.to(torch.float16).contiguous(), codes.shape[1])

    def blocks(self) -> torch.Tensor:
        """The GGUF tensor data: uint8 ``[N, B*18]``, each block ``d`` (fp16) then its 16 bytes."""
        n, b = self.d.shape
        dd = self.d.contiguous().view(torch.uint8).view(n, b, 2)
        return torch.cat((dd, self.qs.view(n, b, QK // 2)), dim=2).reshape(n, b * Q4_BYTES)


@register_format
@dataclass
class PackedQ8_0(_Blocks):
    """A weight or table ``[N, K]`` in llama.cpp's Q8_0: int8 ``qs`` and fp16 ``d`` per block."""

    format: ClassVar[str] = "q8_0"
    bits: ClassVar[int] = 8

    qs: torch.Tensor  # int8 [N, K]
    d: torch.Tensor  # float16 [N, K/32]
    in_features: int

    def __post_init__(self) -> None:
        b = check_blocks(self.in_features, "in_features")
        if self.qs.dtype != torch.int8 or self.qs.dim() != 2 or self.qs.shape[1] != self.in_features:
            raise BlockFormatError(f"q8_0: qs must be int8 [N, {self.in_features}], got {tuple(self.qs.shape)}")
        _check_scales(self.d, self.qs.shape[0], b, "q8_0")

    def dequantize(self) -> torch.Tensor:
        return decode_q8_0(self.qs, self.d)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> PackedQ8_0:
        """Round-to-nearest Q8_0 of ``w`` ``[N, K]``: ``d = amax / 127`` per block (fp16),
        each value rounded to the nearest multiple of that fp16 ``d`` (llama.cpp's
        ``quantize_row_q8_0_ref`` rounds against the fp32 ``d``; nearest on the stored one is
        never worse)."""
        n, k = w.shape
        b = check_blocks(k)
        wb = w.detach().float().reshape(n, b, QK)
        d = (wb.abs().amax(dim=2) / Q8_MAX).to(torch.float16)
        safe = torch.where(d == 0, torch.ones_like(d), d).float()
        q = torch.round(wb / safe[..., None]).clamp_(-Q8_MAX, Q8_MAX)
        return cls(q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous(), k)

    def blocks(self) -> torch.Tensor:
        """The GGUF tensor data: uint8 ``[N, B*34]``, each block ``d`` (fp16) then 32 int8."""
        n, b = self.d.shape
        dd = self.d.contiguous().view(torch.uint8).view(n, b, 2)
        return torch.cat((dd, self.qs.view(torch.uint8).view(n, b, QK)), dim=2).reshape(n, b * Q8_BYTES)


# ----------------------------------------------------------------------------- Q8_0 activations


def quantize_act_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``quantize_row_q8_0`` (x86 path) of ``x`` ``[..., K]``: int8 ``[..., K]`` and
    the fp16 block scales ``[..., K/32]``."""
    *lead, k = x.shape
    b = check_blocks(k, "activation width K")
    xb = x.float().reshape(*lead, b, QK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, Q8_MAX / amax, torch.zeros_like(amax))  # fp32 127/amax, as the C code
    q = torch.round(xb * inv)  # round half to even: _mm256_round_ps(_MM_ROUND_NEAREST)
    d = (amax / Q8_MAX).to(torch.float16)
    return q.to(torch.int8).reshape(*lead, k), d.reshape(*lead, b)


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """The values llama.cpp multiplies for a Q4_0/Q8_0 weight: Q8_0 blocks of ``x``, decoded
    (``q · fp16(d)``), in ``x``'s dtype."""
    q, d = quantize_act_q8_0(x)
    return decode_q8_0(q, d).to(x.dtype)


def round_f16(x: torch.Tensor) -> torch.Tensor:
    """The values llama.cpp multiplies for an F16 weight: activations converted to fp16
    (``type_traits_cpu[GGML_TYPE_F16].vec_dot_type``), in float32."""
    return x.to(torch.float16).float()


__all__ = [
    "BlockFormatError",
    "PackedQ4_0",
    "PackedQ8_0",
    "Q4_BYTES",
    "Q8_BYTES",
    "QK",
    "check_blocks",
    "decode_q4_0",
    "decode_q8_0",
    "expand_blocks",
    "fake_quant_act",
    "pack_q4_0",
    "quantize_act_q8_0",
    "round_f16",
    "unpack_q4_0",
]
