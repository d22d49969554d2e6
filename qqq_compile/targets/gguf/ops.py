"""The GGUF target's ops, ``torch.ops.qqq.{q4_0,q8_0,f16}_linear`` and
``qqq.{q4_0,q8_0}_embedding``: what llama.cpp's CPU backend computes for a Q4_0, Q8_0 or F16
weight (and a lookup in a Q4_0 / Q8_0 table), as graph nodes.

* ``q4_0_linear(x, qs, d, bias)`` / ``q8_0_linear(x, qs, d, bias)``: ``x`` is quantized to Q8_0
  per block of 32 (:func:`~.formats.quantize_act_q8_0`, llama.cpp's ``quantize_row_q8_0``);
  ``ggml_vec_dot_q4_0_q8_0`` / ``ggml_vec_dot_q8_0_q8_0`` then sum over blocks
  ``d_x · d_w · Σ_j q_x q_w`` in float. Here that sum is one float32 matmul of the decoded
  operands, ``Σ_b Σ_j (d_x q_x)(d_w q_w)``: the same terms (each factor is exact in fp32),
  summed in another order, so results differ from llama.cpp's by float rounding only.
* ``f16_linear(x, w, bias)``: an F16 weight multiplies activations converted to fp16
  (``vec_dot_type`` of F16), products summed in float32.

The bias is added in float32 after the product, as llama.cpp's ``ggml_add``. The result has
``x``'s dtype. A pure-torch implementation for every device (this target's runtime is
llama.cpp; this graph is the reference it is checked against), in chunks of output rows so
that a large table (an lm_head of 150k rows) is never decoded whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qqq_compile.targets.gguf.formats import QK, decode_q4_0, decode_q8_0, fake_quant_act, round_f16

ROW_CHUNK = 8192  # output rows decoded at a time

# Kept alive for the life of the process: dropping a Library deregisters what it defined.
_LIB = torch.library.Library("qqq", "FRAGMENT")
SCHEMAS = {
    "q4_0_linear": "q4_0_linear(Tensor x, Tensor qs, Tensor d, Tensor? bias) -> Tensor",
    "q8_0_linear": "q8_0_linear(Tensor x, Tensor qs, Tensor d, Tensor? bias) -> Tensor",
    "f16_linear": "f16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor",
    "q4_0_embedding": "q4_0_embedding(Tensor ids, Tensor qs, Tensor d) -> Tensor",
    "q8_0_embedding": "q8_0_embedding(Tensor ids, Tensor qs, Tensor d) -> Tensor",
}
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


def _check(x: Tensor, k: int, n: int, bias: Tensor | None, name: str) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name}: x must be a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")


def _block_dims(qs: Tensor, d: Tensor, per_row: int, dtype: torch.dtype, name: str) -> tuple[int, int]:
    """``(N, K)`` of block weights; ``per_row``: bytes of ``qs`` per 32 values (16 or 32)."""
    if qs.dtype != dtype or qs.dim() != 2 or d.dtype != torch.float16 or d.dim() != 2:
        raise ValueError(f"{name}: expected qs {dtype} [N, *] and d float16 [N, K/32], got {qs.dtype}, {d.dtype}")
    n, b = d.shape
    if qs.shape != (n, b * per_row):
        raise ValueError(f"{name}: qs has shape {tuple(qs.shape)}, d {tuple(d.shape)}: not one weight")
    return n, b * QK


def _product(xq: Tensor, decode, n: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``xq [..., K] @ decode(rows).T + bias`` in float32, ROW_CHUNK output rows at a time."""
    flat = xq.reshape(-1, xq.shape[-1]).float()
    out = flat.new_empty(flat.shape[0], n)
    for r in range(0, n, ROW_CHUNK):
        rows = slice(r, min(r + ROW_CHUNK, n))
        torch.mm(flat, decode(rows).t(), out=out[:, rows])
    if bias is not None:
        out += bias.float()
    return out.reshape(*xq.shape[:-1], n).to(out_dtype)


def _q4_0_linear(x: Tensor, qs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    n, k = _block_dims(qs, d, QK // 2, torch.uint8, "q4_0_linear")
    _check(x, k, n, bias, "q4_0_linear")
    return _product(fake_quant_act(x.float()), lambda r: decode_q4_0(qs[r], d[r]), n, bias, x.dtype)


def _q8_0_linear(x: Tensor, qs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    n, k = _block_dims(qs, d, QK, torch.int8, "q8_0_linear")
    _check(x, k, n, bias, "q8_0_linear")
    return _product(fake_quant_act(x.float()), lambda r: decode_q8_0(qs[r], d[r]), n, bias, x.dtype)


def _f16_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    if w.dtype != torch.float16 or w.dim() != 2:
        raise ValueError(f"f16_linear: w must be float16 [N, K], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    _check(x, k, n, bias, "f16_linear")
    return _product(round_f16(x), lambda r: w[r].float(), n, bias, x.dtype)


def _q4_0_embedding(ids: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    """Rows ``ids`` of a Q4_0 table, decoded (float32 ``[*ids.shape, K]``): llama.cpp's ``get_rows``."""
    _, k = _block_dims(qs, d, QK // 2, torch.uint8, "q4_0_embedding")
    flat = ids.reshape(-1)
    return decode_q4_0(qs[flat], d[flat]).reshape(*ids.shape, k)


def _q8_0_embedding(ids: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    """Rows ``ids`` of a Q8_0 table, decoded (float32 ``[*ids.shape, K]``)."""
    _, k = _block_dims(qs, d, QK, torch.int8, "q8_0_embedding")
    flat = ids.reshape(-1)
    return decode_q8_0(qs[flat], d[flat]).reshape(*ids.shape, k)


def _fake(x: Tensor, n: int, k: int, bias: Tensor | None, name: str) -> Tensor:
    _check(x, k, n, bias, name)
    return x.new_empty((*x.shape[:-1], n))


_LIB.impl("q4_0_linear", _q4_0_linear, "CompositeExplicitAutograd")
_LIB.impl("q8_0_linear", _q8_0_linear, "CompositeExplicitAutograd")
_LIB.impl("f16_linear", _f16_linear, "CompositeExplicitAutograd")
_LIB.impl("q4_0_embedding", _q4_0_embedding, "CompositeExplicitAutograd")
_LIB.impl("q8_0_embedding", _q8_0_embedding, "CompositeExplicitAutograd")


@torch.library.register_fake("qqq::q4_0_linear")
def _(x: Tensor, qs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    return _fake(x, *_block_dims(qs, d, QK // 2, torch.uint8, "q4_0_linear"), bias, "q4_0_linear")


@torch.library.register_fake("qqq::q8_0_linear")
def _(x: Tensor, qs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    return _fake(x, *_block_dims(qs, d, QK, torch.int8, "q8_0_linear"), bias, "q8_0_linear")


@torch.library.register_fake("qqq::f16_linear")
def _(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return _fake(x, w.shape[0], w.shape[1], bias, "f16_linear")


@torch.library.register_fake("qqq::q4_0_embedding")
def _(ids: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    _, k = _block_dims(qs, d, QK // 2, torch.uint8, "q4_0_embedding")
    return ids.new_empty((*ids.shape, k), dtype=torch.float32)


@torch.library.register_fake("qqq::q8_0_embedding")
def _(ids: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    _, k = _block_dims(qs, d, QK, torch.int8, "q8_0_embedding")
    return ids.new_empty((*ids.shape, k), dtype=torch.float32)


Q4_0_LINEAR = torch.ops.qqq.q4_0_linear.default
Q8_0_LINEAR = torch.ops.qqq.q8_0_linear.default
F16_LINEAR = torch.ops.qqq.f16_linear.default
#: Every linear op of the GGUF target.
LINEAR_OPS = (Q4_0_LINEAR, Q8_0_LINEAR, F16_LINEAR)
Q4_0_EMBEDDING = torch.ops.qqq.q4_0_embedding.default
Q8_0_EMBEDDING = torch.ops.qqq.q8_0_embedding.default

__all__ = [
    "F16_LINEAR",
    "LINEAR_OPS",
    "Q4_0_EMBEDDING",
    "Q4_0_LINEAR",
    "Q8_0_EMBEDDING",
    "Q8_0_LINEAR",
    "ROW_CHUNK",
    "SCHEMAS",
]
