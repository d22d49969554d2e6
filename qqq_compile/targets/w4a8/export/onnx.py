"""Export a compiled model to ONNX for onnxruntime, with dynamic batch and sequence.

Two encodings of each ``torch.ops.qqq`` linear (``kind``):

* ``"matmulnbits"`` (default): the per-token int8 quantize-dequantize of the activations
  (our arithmetic, spelled in standard ops), then onnxruntime's contrib op
  ``com.microsoft::MatMulNBits`` (``bits=4``, ``accuracy_level=4``). ``B`` is uint8
  ``[N, ceil(K/block), block/2]`` of offset-binary nibbles (``q + 8``, the op's default
  zero point), ``scales`` ``[N, ceil(K/block)]``; ``K`` is padded to whole blocks with
  zeros. With ``accuracy_level=4`` onnxruntime re-quantizes the activations to int8 *per
  block of ``block_size`` columns of each row* and runs an int8 GEMM; on values already on
  the per-token int8 grid that step is nearly lossless (a block's scale is never coarser
  than its token's), so the model keeps the per-token int8 error it was calibrated for.
* ``"matmulnbits_blockwise"``: the same without our per-token step: onnxruntime's block-wise
  int8 activations alone. Slightly faster, but not the arithmetic the model was quantized
  and evaluated with (measured on SmolLM2: 2% lower perplexity than ours on 4 windows).
* ``"dq"``: only standard ONNX (opset 21): the per-token int8 quantize-dequantize of the
  activations spelled out (``Abs``/``ReduceMax``/``Div``/``Round``/``Clip``/``Mul``), then
  ``DequantizeLinear`` of an INT4 ``[K, N]`` weight (blocked along axis 0) and ``MatMul``.
  The exact W4A8 semantics in portable ops; onnxruntime fuses the weight half into its
  int4 kernel.

``block_size`` must be a power of two >= 16 for ``MatMulNBits``: the largest such power
dividing the group size is used (per-channel weights replicate their row scale over
blocks of 128). Our fp16 two-level group scales (``W8 = round(q4 * gs)``) are written as
``q4`` with ``scale = s_ch * gs``, the weight before that rounding (see
:mod:`.compressed_tensors`).

Fused ``qqq.rmsnorm_quant`` + ``qqq.w4a8_linear_q`` pairs are exported as a float RMSNorm
feeding the linear over its float input.

The int8 lm_head of the ``int8_head`` pass (``qqq.w8a8_linear``, on by default) is written
in standard ops for every ``kind``: our per-token int8 quantize-dequantize of its input,
then ``MatMul`` against ``Transpose(DequantizeLinear(W8, scale, axis=0))`` over the int8
``[N, K]`` initializer and its float32 per-row scales. The int8 embedding is exported as
the graph spells it: ``Gather`` of the int8 table, ``Cast``, times a ``Gather`` of the
scales. A tied head and embedding read one int8 initializer.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.targets.w4a8.export import (
    ExportError,
    bound_args,
    check_qqq_ops,
    int8_linears,
    qqq_linears,
    qqq_op_name,
    whole_graph,
)
from qqq_compile.targets.w4a8.formats import PackedW4

KINDS = ("matmulnbits", "matmulnbits_blockwise", "dq")
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations, int32 accumulation
_CHANNEL_BLOCK = 128
_OPSET = 21  # first opset with INT4 and blocked DequantizeLinear


# ----------------------------------------------------------------------------- weight layouts


def _ort_block(p: PackedW4) -> int:
    if p.group_scale is None:
        return _CHANNEL_BLOCK
    block = p.group_size & -p.group_size  # largest power of two dividing the group size
    if block < 16:
        raise ExportError(
            f"group size {p.group_size} has no power-of-two divisor >= 16, which MatMulNBits needs; "
            "use kind='dq' or a group size such as 32, 64 or 128"
        )
    return min(block, 256)


def _int4_and_scales(p: PackedW4, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values ``[N, K]`` and float scales ``[N, ceil(K/block)]`` with ``W ≈ q * scale``."""
    q4 = p.int4()
    nb = math.ceil(p.in_features / block)
    if p.group_scale is None:
        return q4, (16 * p.channel_scale.float())[:, None].expand(-1, nb).contiguous()
    step = p.channel_scale.float()[:, None] * p.group_scale.float()
    cols = torch.arange(nb) * block // p.group_size
    return q4, step[:, cols].contiguous()


def matmulnbits_weight(p: PackedW4, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B uint8 [N, nb, block/2], scales float32 [N, nb])`` in MatMulNBits' layout."""
    q4, scales = _int4_and_scales(p, block)
    n, k = q4.shape
    nb = scales.shape[1]
    u = torch.nn.functional.pad(q4.to(torch.int16) + 8, (0, nb * block - k), value=8).to(torch.uint8)
    b = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, nb, block // 2)
    return b.contiguous(), scales


def dq_weight(p: PackedW4, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int4 values as int8 [K, N], scales float32 [nb, N])`` for blocked DequantizeLinear
    along axis 0; the exporter rewrites the int8 initializer to ONNX INT4 afterwards."""
    q4, scales = _int4_and_scales(p, block)
    return q4.t().contiguous(), scales.t().contiguous()


# ----------------------------------------------------------------------------- torch-side ops

_LIB: list[Any] = []


def _dequant_rows(w: torch.Tensor, scales: torch.Tensor, k: int, block: int) -> torch.Tensor:
    return w.float() * scales.float().repeat_interleave(block, dim=1)[:, :k]


def _register_torch_ops() -> None:
    """Stand-ins the FX graph calls during export; each has one ONNX translation."""
    if _LIB:
        return
    lib = torch.library.Library("qqq_onnx", "FRAGMENT")  # noqa: TOR901 - kept alive in _LIB
    lib.define("matmul_nbits(Tensor x, Tensor b, Tensor scales, Tensor? bias, int K, int N, int block_size) -> Tensor")
    lib.define("dq_matmul(Tensor x, Tensor w, Tensor scales, Tensor? bias, int K, int N, int block_size) -> Tensor")
    lib.define("per_token_qdq(Tensor x) -> Tensor")
    lib.define("w8_matmul(Tensor x, Tensor w8, Tensor scale, Tensor? bias) -> Tensor")

    def matmul_nbits(x, b, scales, bias, K, N, block_size):  # noqa: N803 - ONNX attribute names
        lo, hi = (b & 0xF).to(torch.int16) - 8, (b >> 4).to(torch.int16) - 8
        q = torch.stack((lo, hi), -1).reshape(N, -1)[:, :K]
        y = x.float() @ _dequant_rows(q, scales, K, block_size).t()
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def dq_matmul(x, w, scales, bias, K, N, block_size):  # noqa: N803
        from qqq_compile.targets.w4a8.formats import fake_quant_act

        y = fake_quant_act(x).float() @ _dequant_rows(w.t(), scales.t(), K, block_size).t()
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def per_token_qdq(x):
        from qqq_compile.targets.w4a8.formats import fake_quant_act

        return fake_quant_act(x)

    def w8_matmul(x, w8, scale, bias):
        from qqq_compile.targets.w4a8.formats import fake_quant_act

        y = fake_quant_act(x).float() @ (w8.float() * scale.float()[:, None]).t()
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def fake(x, w, scales, bias, K, N, block_size):  # noqa: N803
        return x.new_empty((*x.shape[:-1], N))

    for name, fn in (("matmul_nbits", matmul_nbits), ("dq_matmul", dq_matmul)):
        lib.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"qqq_onnx::{name}", fake, lib=lib)
    lib.impl("per_token_qdq", per_token_qdq, "CompositeExplicitAutograd")
    lib.impl("w8_matmul", w8_matmul, "CompositeExplicitAutograd")
    torch.library.register_fake(
        "qqq_onnx::w8_matmul", lambda x, w8, scale, bias: x.new_empty((*x.shape[:-1], w8.shape[0])), lib=lib
    )
    torch.library.register_fake("qqq_onnx::per_token_qdq", torch.empty_like, lib=lib)
    _LIB.append(lib)


def _register_onnx_schema() -> None:
    """onnxscript builds contrib-op calls from ONNX schemas; MatMulNBits is onnxruntime's."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    p = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.AttrType.INT
    schema = OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        doc="onnxruntime contrib op: A @ dequant(B).T with blockwise n-bit B",
        inputs=[
            p("A", "T1"),
            p("B", "T2"),
            p("scales", "T1"),
            p("zero_points", "T3", param_option=opt),
            p("g_idx", "T4", param_option=opt),
            p("bias", "T1", param_option=opt),
        ],
        outputs=[p("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float16)", "tensor(float)", "tensor(bfloat16)"], ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[
            OpSchema.Attribute("K", attr, "", required=True),
            OpSchema.Attribute("N", attr, "", required=True),
            OpSchema.Attribute("block_size", attr, "", required=True),
            OpSchema.Attribute("bits", attr, ""),
            OpSchema.Attribute("accuracy_level", attr, ""),
        ],
    )
    onnx.defs.register_schema(schema)


def _translations() -> dict[Any, Any]:
    from onnxscript import opset21 as op
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)

    def matmul_nbits(x, b, scales, bias, K: int, N: int, block_size: int):  # noqa: N803
        return msft.MatMulNBits(
            x, b, scales, None, None, bias, K=K, N=N, bits=4, block_size=block_size, accuracy_level=ACCURACY_LEVEL
        )

    def per_token_qdq(x):
        # per-token symmetric int8, exactly as formats.quantize_act_per_token
        s = op.Div(op.Max(op.ReduceMax(op.Abs(x), [-1], keepdims=1), op.CastLike(1e-8, x)), op.CastLike(127.0, x))
        return op.Mul(op.Clip(op.Round(op.Div(x, s)), op.CastLike(-127.0, x), op.CastLike(127.0, x)), s)

    def dq_matmul(x, w, scales, bias, K: int, N: int, block_size: int):  # noqa: N803
        y = op.MatMul(per_token_qdq(x), op.DequantizeLinear(w, scales, axis=0, block_size=block_size))
        return y if bias is None else op.Add(y, bias)

    def w8_matmul(x, w8, scale, bias):
        w = op.CastLike(op.DequantizeLinear(w8, scale, axis=0), x)  # [N, K]
        y = op.MatMul(per_token_qdq(x), op.Transpose(w, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    return {
        torch.ops.qqq_onnx.w8_matmul.default: w8_matmul,
        torch.ops.qqq_onnx.matmul_nbits.default: matmul_nbits,
        torch.ops.qqq_onnx.dq_matmul.default: dq_matmul,
        torch.ops.qqq_onnx.per_token_qdq.default: per_token_qdq,
    }


# ----------------------------------------------------------------------------- graph rewrite


def _float_input(node: Node, x: Any) -> Node:
    """The float tensor a ``w4a8_linear_q`` input was quantized from: RMSNorm in float for
    ``rmsnorm_quant``, the input itself for ``quantize_act``."""
    g = node.graph
    src = x.args[0] if isinstance(x, Node) and x.op == "call_function" and "getitem" in str(x.target) else None
    kind = qqq_op_name(src) if isinstance(src, Node) else None
    if kind == "quantize_act":
        return bound_args(src)["x"]
    if kind != "rmsnorm_quant":
        raise ExportError(f"{node.name}: w4a8_linear_q input does not come from qqq.rmsnorm_quant/quantize_act")
    cached = src.meta.get("qqq_onnx_float")
    if cached is not None:
        return cached
    a = bound_args(src)
    aten = torch.ops.aten
    with g.inserting_before(node):  # the first consumer; later ones reuse the result
        xf = g.call_function(aten._to_copy.default, (a["x"],), {"dtype": torch.float32})
        ms = g.call_function(aten.mean.dim, (g.call_function(aten.pow.Tensor_Scalar, (xf, 2)), [-1], True))
        r = g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (ms, float(a["eps"]))),))
        y = g.call_function(aten.mul.Tensor, (g.call_function(aten.mul.Tensor, (xf, r)), a["weight"]))
        out = g.call_function(aten._to_copy.default, (y,), {"dtype": a["x"].meta["val"].dtype})
    src.meta["qqq_onnx_float"] = out
    return out


def onnx_graph(gm: GraphModule, kind: str = "matmulnbits") -> tuple[GraphModule, dict[str, tuple[int, int]]]:
    """A new GraphModule (sharing ``gm``'s float weights) whose qqq linears call the
    ``qqq_onnx`` stand-ins over ORT-layout buffers. Also returns, for ``kind="dq"``, the
    int8 weight buffers to turn into INT4 initializers, with their ``[K, N]`` shapes."""
    if kind not in KINDS:
        raise ExportError(f"kind must be one of {KINDS}, got {kind!r}")
    check_qqq_ops(gm, "ONNX")
    _register_torch_ops()
    import copy

    new = GraphModule(gm, copy.deepcopy(gm.graph))
    g = new.graph
    int4_buffers: dict[str, tuple[int, int]] = {}
    for i, ql in enumerate(qqq_linears(new)):
        p = ql.packed
        nbits = kind.startswith("matmulnbits")
        block = _ort_block(p) if nbits else (p.group_size if p.group_scale is not None else p.in_features)
        w, s = matmulnbits_weight(p, block) if nbits else dq_weight(p, block)
        names = (f"qqq_onnx_{i}_w", f"qqq_onnx_{i}_scales")
        new.register_buffer(names[0], w)
        new.register_buffer(names[1], s)
        if kind == "dq":
            int4_buffers[names[0]] = (p.in_features, p.out_features)
        node = ql.node
        a = bound_args(node)
        x = a["x"] if ql.op == "w4a8_linear" else _float_input(node, a["xq"])
        with g.inserting_before(node):
            wn, sn = g.get_attr(names[0]), g.get_attr(names[1])
            if kind == "matmulnbits":  # our per-token int8 first; ORT's re-quantization is then ~exact
                x = g.call_function(torch.ops.qqq_onnx.per_token_qdq.default, (x,))
            target = torch.ops.qqq_onnx.matmul_nbits.default if nbits else torch.ops.qqq_onnx.dq_matmul.default
            rep = g.call_function(target, (x, wn, sn, a["bias"], p.in_features, p.out_features, block))
        rep.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(rep)
        g.erase_node(node)
    for il in int8_linears(new):  # the int8_head pass's lm_head: int8 DequantizeLinear + MatMul
        node = il.node
        a = bound_args(node)
        with g.inserting_before(node):
            rep = g.call_function(torch.ops.qqq_onnx.w8_matmul.default, (a["x"], a["w8"], a["scale"], a["bias"]))
        rep.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(rep)
        g.erase_node(node)
    g.eliminate_dead_code()
    used = {n.target for n in g.nodes if n.op == "get_attr"}
    for name in [n for n, _ in new.named_buffers() if n.startswith("qqq_") and n not in used]:
        delattr(new, name)
    g.lint()
    new.recompile()
    return new, int4_buffers


class _LogitsOnly(torch.nn.Module):
    def __init__(self, gm: GraphModule, input_names: list[str]):
        super().__init__()
        self.gm = gm
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.gm(**dict(zip(self.input_names, inputs, strict=True)))
        return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def _to_int4_initializers(path: Path, int4_buffers: dict[str, tuple[int, int]], external: bool) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    found = set()
    for init in model.graph.initializer:
        key = next((k for k in int4_buffers if init.name == k or init.name.endswith("." + k)), None)
        if key is None:
            continue
        q = numpy_helper.to_array(init).astype("int8").reshape(-1)
        if q.size % 2:
            q = __import__("numpy").concatenate([q, q[:1] * 0])
        u = q.astype("uint8") & 0xF
        init.raw_data = (u[0::2] | (u[1::2] << 4)).tobytes()
        init.data_type = onnx.TensorProto.INT4
        del init.dims[:]
        init.dims.extend(int4_buffers[key])
        found.add(key)
    missing = set(int4_buffers) - found
    if missing:
        raise ExportError(f"ONNX export lost the weight initializers {sorted(missing)[:3]}... (constant-folded?)")
    if external:  # a protobuf holds at most 2 GB
        (path.parent / (path.name + ".data")).unlink(missing_ok=True)  # loaded above; onnx appends
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def export_onnx(
    compiled: Any,
    path: str | os.PathLike,
    *,
    kind: str = "matmulnbits",
    example_inputs: torch.Tensor | None = None,
    check: bool = True,
) -> Path:
    """Write ``compiled`` to ``path`` as ONNX (opset 21) taking ``input_ids`` ``[batch, seq]``
    (both dynamic) and returning ``logits`` ``[batch, seq, vocab]``.

    ``kind="matmulnbits"`` uses onnxruntime's int4 contrib op after our per-token int8
    activation step; ``"matmulnbits_blockwise"`` leaves the activations to onnxruntime's
    block-wise int8; ``kind="dq"`` uses only standard ops (see the module docstring).
    ``check`` runs ``onnx.checker`` on the result.
    Models whose tensors exceed 1.8 GB keep them in ``<path>.data`` beside the file.
    """
    import onnx

    _register_onnx_schema()
    gm, int4_buffers = onnx_graph(whole_graph(compiled), kind)
    names = list(getattr(compiled, "input_names", None) or ["input_ids"])
    vocab = int((compiled.model_config or {}).get("vocab_size", 2))
    if example_inputs is None:
        example_inputs = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
    inputs = tuple(example_inputs for _ in names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))
    with torch.no_grad():
        prog = torch.onnx.export(
            _LogitsOnly(gm, names).eval(),
            inputs,
            dynamo=True,
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),),  # one entry: *inputs
            custom_translation_table=_translations(),
            opset_version=_OPSET,
            input_names=names,
            output_names=["logits"],
            optimize=True,
            verbose=False,
        )
    external = nbytes > 1_800_000_000
    prog.save(str(path), external_data=external)
    if int4_buffers:
        _to_int4_initializers(path, int4_buffers, external)
    if check:
        onnx.checker.check_model(str(path))
    return path


# ----------------------------------------------------------------------------- onnxruntime


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported model (``threads`` defaults to torch's)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of an ORT session (from :func:`ort_session`) on ``input_ids``."""
    feed = {i.name: input_ids.numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], feed)[0])


@dataclass
class OrtTiming:
    """End-to-end onnxruntime timings of one forward over ``input_ids``."""

    median_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    session_s: float  # creating the session (graph optimisation, prepacking)


def time_onnx(
    path: str | os.PathLike, input_ids: torch.Tensor, runs: int = 10, threads: int | None = None
) -> OrtTiming:
    """Time ``runs`` forwards of the ONNX model at ``path`` on ``input_ids`` (after one warm-up)."""
    t0 = time.perf_counter()
    sess = ort_session(path, threads)
    session_s = time.perf_counter() - t0
    run_onnx(sess, input_ids)
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        run_onnx(sess, input_ids)
        times.append(1e3 * (time.perf_counter() - t))
    return OrtTiming(statistics.median(times), min(times), statistics.fmean(times), len(times), session_s)
