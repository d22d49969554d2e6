"""The KV-cache rewrite: turn a full-sequence causal-LM graph into a prefill/decode step.

``add_kv_cache(gm, max_batch, max_len)`` works from the graph alone, on any graph the
pipeline produced (float, rotated, lowered to W4A8): the passes stay unchanged and the
perplexity of the model that generates is the perplexity of the graph ``compile()`` returns
(SmolLM2: +0.06% with the default bf16 products in a prompt's attention, 24.154 → 24.168;
``benchmarks/attention_precision.py``).

What it finds and rewrites:

* **Attention**: every ``aten.scaled_dot_product_attention`` node. Its K and V inputs
  are traced back through Hugging Face's ``repeat_kv`` chain (unsqueeze / expand / clone /
  view) to the per-KV-head tensors ``[B, Hkv, T, D]``; those are written into static
  buffers ``[max_batch, Hkv, max_len + 1, D]`` (memory that is resident only once written:
  :func:`lazy_zeros`) at ``cache_position`` (``index_copy_``, the ExecuTorch pattern), and
  SDPA reads the first ``L`` slots back with ``enable_gqa`` (no repeated copy of the cache
  per step).
* **Positions**: every ``arange(0, T)`` over the token axis becomes ``cache_position``
  (the slots written), and every ``position_ids`` made from it (``unsqueeze(0)``) the row's
  own positions ``[B, T]`` (rotary embeddings, absolute position embeddings).
* **Mask**: built once from positions, never ``is_causal`` (SDPA's ``is_causal`` is
  top-left aligned: one query against many keys would see key 0 only). Key slot ``j`` is
  visible to the query at position ``p`` when ``j <= p`` and ``attention_mask[b, j]`` is
  set; every query also sees its own slot, so a left-padding row stays finite.
* **Logits**: optionally only the last position's (what generation needs; prefill then
  skips ``T - 1`` rows of the lm_head GEMM).

The step takes ``(input_ids [B, T], attention_mask [B, L], cache_position [T], cache_row)``
with ``L = past + T`` (transformers' convention) and returns logits. One graph serves prefill
(``T > 1``) and decode (``T = 1``). Batch rows share cache slots (``cache_position``), not
positions: where the graph makes ``position_ids`` each row gets its own, counted from its
first valid slot (transformers' ``cumsum(attention_mask) - 1``), so a left-padded row, or a
row that joins a running batch at later slots, has the rotary q and k it has alone.
``cache_row`` (optional, a 0-d long tensor, default 0) is the cache row
of the batch's first row: the batch reads and writes cache rows ``cache_row .. cache_row + B - 1``,
so one row can be prefilled while the others keep their cache (a server's requests join a
running batch that way).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from qqq_compile.compiler.block_runner import graph_device
from qqq_compile.graph.attention import sdpa_arg

aten = torch.ops.aten

# Ops of transformers' repeat_kv chain (and layout no-ops) between the per-KV-head K/V
# and SDPA. Walking back through them finds the tensor to cache.
_KV_CHAIN = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.contiguous.default,
}
_ARANGES = {aten.arange.start_step, aten.arange.start, aten.arange.default}
# Ops that may sit between the lm_head matmul and the output (softcapping, casts).
_LOGIT_EPILOGUE = {aten.div.Tensor, aten.tanh.default, aten.mul.Tensor, aten._to_copy.default, aten.to.dtype}
_LINEAR_NAMES = ("linear", "w4a8_linear", "w4a8_linear_q", "w8a8_linear", "addmm", "mm", "matmul")
_MAX = 2**63 - 1


class CacheError(ValueError):
    """The graph cannot take a KV cache; the message names what is missing and the way out."""


@dataclass
class CacheSpec:
    """What the rewrite built: where the cache lives and how big it is."""

    max_batch: int
    max_len: int
    layers: list[dict[str, Any]] = field(default_factory=list)  # per SDPA: name, kv heads, head dim, dtype
    positions_replaced: int = 0
    row_positions: int = 0  # position_ids made per batch row (_row_positions)
    last_logits_only: bool = True

    def cache_bytes(self) -> int:
        return sum(
            2 * self.max_batch * layer["kv_heads"] * self.max_len * layer["head_dim"] * layer["itemsize"]
            for layer in self.layers
        )


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero tensor on ``device`` (torch's default when None). In host memory its pages
    are only resident once written: anonymous ``mmap`` memory (zero-filled by the kernel on
    first touch; ``torch.zeros`` writes every page at once). A cache sized for the model's
    whole context then costs memory in proportion to the positions a request uses."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 1 << 20 or device.type != "cpu":  # an accelerator's memory has no such mapping
        return torch.zeros(shape, dtype=dtype, device=device)
    # The tensor keeps a reference to the mapping; it is unmapped with the tensor.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else None


def _is_full_slice(n: Node) -> bool:
    args = list(n.args) + [None] * 4
    start, end = args[2] if len(n.args) > 2 else 0, args[3] if len(n.args) > 3 else _MAX
    return start in (0, None) and (end is None or end == _MAX) and n.kwargs.get("step", 1) == 1


def _kv_source(n: Node, seq: Any) -> Node:
    """Walk from SDPA's K/V input back to the per-KV-head ``[B, Hkv, T, D]`` tensor."""
    cur, best = n, n
    while isinstance(cur, Node) and cur.op == "call_function" and cur.target in _KV_CHAIN:
        if cur.target is aten.slice.Tensor and not _is_full_slice(cur):
            break
        cur = cur.args[0]
        v = _val(cur)
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2] == seq:
            best = cur
    return best


def _position_aranges(graph: Graph, seq_nodes: set[Node]) -> list[Node]:
    out = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _ARANGES:
            continue
        if n.target is aten.arange.default:
            start, end = 0, n.args[0]
        else:
            start, end = n.args[0], n.args[1]
        step = n.args[2] if n.target is aten.arange.start_step and len(n.args) > 2 else 1
        if start == 0 and step == 1 and end in seq_nodes:
            out.append(n)
    return out


_SHIFTS = {aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar}


def _shifts_from(n: Any, origin: Node) -> list[tuple[Any, Any]] | None:
    """The ``(op, constant)`` additions that lead from ``origin`` to ``n`` (``[]`` for
    ``origin`` itself), or None when ``n`` is something else."""
    chain: list[tuple[Any, Any]] = []
    while n is not origin:
        if not (isinstance(n, Node) and n.op == "call_function" and n.target in _SHIFTS and len(n.args) == 2):
            return None
        if isinstance(n.args[1], Node):
            return None
        chain.append((n.target, n.args[1]))
        n = n.args[0]
    return chain[::-1]


def _row_positions(graph: Graph, pos_in: Node, mask_in: Node) -> int:
    """Give every batch row its own positions where the graph makes ``position_ids``
    (``cache_position.unsqueeze(0)``, shifted by constants): ``[B, T]``, the number of valid
    slots before each query slot (transformers' ``cumsum(attention_mask) - 1``). A row that
    starts at slot ``s`` (left padding, a server's joining request) then gets positions
    ``0, 1, …`` as it would alone, so its rotary q and k are bit for bit those of a lone
    ``generate()``; with the shared slot positions they differed by the rotary angles'
    float rounding. Returns how many sites were rewired (transformers' own mask code, which
    the rewrite leaves dead, makes some of them: 3 in a LLaMA graph, 1 of them live)."""
    sites = [
        (n, chain)
        for n in graph.nodes
        if n.op == "call_function" and n.target is aten.unsqueeze.default and n.args[1] == 0
        for chain in [_shifts_from(n.args[0], pos_in)]
        if chain is not None
    ]
    if not sites:
        return 0
    with graph.inserting_before(sites[0][0]):
        valid = graph.call_function(aten.ne.Scalar, (mask_in, 0))  # [B, L]
        counts = graph.call_function(aten.cumsum.default, (valid, 1), {"dtype": torch.long})
        at_queries = graph.call_function(aten.index_select.default, (counts, 1, pos_in))  # [B, T]
        rows = graph.call_function(aten.sub.Tensor, (at_queries, 1))
    for site, chain in sites:
        with graph.inserting_before(site):
            cur = rows
            for op, c in chain:
                cur = graph.call_function(op, (cur, c))
        site.replace_all_uses_with(cur)
        graph.erase_node(site)
    return len(sites)


def _lm_head(out: Node) -> tuple[Node, int] | None:
    """The lm_head node and the index of its activation argument, found from the logits output."""
    cur = out
    while isinstance(cur, Node) and cur.op == "call_function":
        name = getattr(cur.target, "__name__", str(cur.target)).split(".")[0]
        if name in _LINEAR_NAMES:
            return cur, 1 if cur.target is aten.addmm.default else 0
        if cur.target not in _LOGIT_EPILOGUE:
            return None
        cur = cur.args[0]
    return None


def _converted_cache_attention(
    graph: Graph, q: Node, kv: list[Node], mask: Node, scale: float | None, head_dim: int, gqa: bool
) -> Node:
    """Attention over a bf16 cache (K d-major): the C++ op when loaded (its prefill takes bf16
    dot products), else SDPA over the cache upcast to q's dtype."""
    from qqq_compile.targets.w4a8.kernels.cpu import ensure_cpp_kernels

    scale = float(scale) if scale is not None else head_dim**-0.5
    if ensure_cpp_kernels():
        return graph.call_function(torch.ops.qqq_cpu.attention_bf16kv.default, (q, kv[0], kv[1], mask, scale))
    # Contiguous upcasts: SDPA then takes its flash kernel, whose [B, T, H, D] output layout
    # the captured graph's views after attention rely on (as with an fp32 cache).
    up = {"dtype": _val(q).dtype, "memory_format": torch.contiguous_format}
    k_nat = graph.call_function(aten.transpose.int, (kv[0], 2, 3))
    k = graph.call_function(aten._to_copy.default, (k_nat,), up)
    v = graph.call_function(aten._to_copy.default, (kv[1],), up)
    return graph.call_function(
        aten.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, False), {"scale": scale, "enable_gqa": gqa}
    )


def _f32_kernel_applies(device: torch.device, q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether attention over an fp32 cache on the CPU runs ``qqq_cpu::attention_f32kv``
    (its one-token kernel took half of torch's SDPA time at decode: 0.71 vs 1.50 ms for
    SmolLM2's 30 layers at 512 context, 2 threads; its prefill kernel, which skips the tiles
    the causal mask hides, ~64 vs ~104 ms per 512-token prompt)."""
    from qqq_compile.targets.w4a8.kernels.cpu import ensure_cpp_kernels

    return device.type == "cpu" and q.dtype == kv.dtype == torch.float32 and ensure_cpp_kernels()


def _step_mask(graph: Graph, mask_in: Node, pos_in: Node, batch: Node, kv_len: Node, device: torch.device) -> Node:
    """The bool mask [B, 1, T, L] every attention of the step reads: key j is visible to the
    token at position p when ``j <= p`` and ``attention_mask[b, j]``, and always when ``j == p``.
    On the CPU with the C++ kernels: one ``qqq_cpu::attention_mask`` call (Inductor recomputed
    the portable chain inside each layer's kernel, serially; SmolLM2's decode step 4% faster,
    its prefill 1%); else the portable ops."""
    from qqq_compile.targets.w4a8.kernels.cpu import ensure_cpp_kernels

    if device.type == "cpu" and ensure_cpp_kernels():
        return graph.call_function(torch.ops.qqq_cpu.attention_mask.default, (mask_in, pos_in))
    slots = graph.call_function(aten.arange.default, (kv_len,), {"dtype": torch.long, "device": device})
    key_row = graph.call_function(aten.unsqueeze.default, (slots, 0))  # [1, L]
    q_col = graph.call_function(aten.unsqueeze.default, (pos_in, 1))  # [T, 1]
    causal = graph.call_function(aten.le.Tensor, (key_row, q_col))  # [T, L]
    own = graph.call_function(aten.eq.Tensor, (key_row, q_col))
    valid = graph.call_function(aten.ne.Scalar, (mask_in, 0))  # [B, L]
    valid4 = graph.call_function(aten.view.default, (valid, [batch, 1, 1, kv_len]))
    seen = graph.call_function(aten.bitwise_and.Tensor, (causal, valid4))  # [B, 1, T, L]
    return graph.call_function(aten.bitwise_or.Tensor, (seen, own))


def _first_row(cache_row: torch.Tensor | None, batch: Any, max_batch: int) -> Any:
    """The cache row of the batch's first row: ``cache_row`` (0 when not given). Under
    export it is data-dependent; clamping it to ``max_batch - B`` lets export prove the
    row slice in range (callers check the range first: :class:`~qqq_compile.runtime.steps.DecodeStep`)."""
    if cache_row is None:
        return 0
    row = cache_row.item()
    torch._check(row >= 0)
    return torch.sym_min(row, max_batch - batch)


def add_kv_cache(
    gm: GraphModule,
    *,
    max_batch: int,
    max_len: int,
    input_name: str = "input_ids",
    last_logits_only: bool = True,
    cache_dtype: torch.dtype | None = None,
    bf16_attention: bool = True,
) -> tuple[GraphModule, CacheSpec]:
    """A new GraphModule ``(input_ids, attention_mask, cache_position, cache_row=None) -> logits``
    with a static KV cache in its buffers. ``gm`` is left as it was; weights are shared, not copied.

    ``cache_dtype``: None keeps K/V's dtype (an fp32 cache on the CPU: attention runs
    ``qqq_cpu::attention_f32kv`` when the C++ kernels are loaded: a one-token kernel at decode,
    the prefill kernel for several tokens, SDPA for shapes neither covers). ``torch.bfloat16``
    stores them rounded to bf16 (half the bytes each decode step reads), K d-major, and attention runs
    ``qqq_cpu::attention_bf16kv`` (a one-token kernel; torch's CPU SDPA on bf16 was slower
    than on fp32) when the C++ kernels are loaded, else SDPA over the upcast cache; its
    prefill (several tokens) runs the prefill kernel with bf16 dot products and fp32 sums
    where the CPU has AVX512-BF16 (1.6x faster than fp32 products), so a bf16 cache means
    bf16 attention, the precision of a bf16 model's attention on a GPU.

    ``bf16_attention`` (default True): an fp32 cache's prefill also takes bf16 dot products
    with fp32 sums and an fp32 softmax (where the CPU has AVX512-BF16; 1.54x faster per
    SmolLM2 layer at 512 tokens, perplexity +0.059%); decode keeps fp32 products. It is
    computed per row: every row gets its own positions (``_row_positions``) and the kernel
    tiles each row's keys from its first one, so a row placed after others' slots (a server's
    joining request, a left-padded row) computes bit for bit what it computes alone. False
    keeps an fp32 cache's products fp32 (to float rounding of SDPA); a bf16 cache always
    takes bf16 products."""
    if cache_dtype not in (None, torch.bfloat16):
        raise CacheError(f"cache_dtype must be None or torch.bfloat16, got {cache_dtype}")
    if max_batch < 1 or max_len < 2:
        raise CacheError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch} and {max_len}")
    graph = Graph()
    out_val = graph.graph_copy(gm.graph, {})
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ids = next((p for p in placeholders if p.target == input_name), None)
    if ids is None or len(placeholders) != 1:
        names = [p.target for p in placeholders]
        raise CacheError(
            f"the KV-cache rewrite needs a graph whose only input is {input_name!r}, got inputs {names}; "
            "compile the causal LM with token-id example inputs"
        )
    sdpa_op = aten.scaled_dot_product_attention.default
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target is sdpa_op]
    if not sdpas:
        raise CacheError(
            "the graph has no scaled_dot_product_attention node, so there is no attention to cache: "
            "load the model with attn_implementation='sdpa' (transformers' default) before compile()"
        )
    seq_nodes = {
        n
        for n in graph.nodes
        if n.op == "call_function" and n.target is aten.sym_size.int and n.args[0] is ids and n.args[1] == 1
    }
    ids_val = _val(ids)
    seq_sym = ids_val.shape[1] if isinstance(ids_val, torch.Tensor) else None
    device = graph_device(gm)  # the cache buffers and the mask's slot indices live with the weights

    # New inputs and the shared mask [B, 1, T, L], built once before the first computation.
    first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(first):
        mask_in = graph.placeholder("attention_mask")
        pos_in = graph.placeholder("cache_position")
        row_in = graph.placeholder("cache_row", default_value=None)
        batch = graph.call_function(aten.sym_size.int, (ids, 0))
        first_row = graph.call_function(_first_row, (row_in, batch, max_batch))
        kv_len = graph.call_function(aten.sym_size.int, (mask_in, 1))
        mask = _step_mask(graph, mask_in, pos_in, batch, kv_len, device)

    aranges = _position_aranges(graph, seq_nodes)
    for a in aranges:
        a.replace_all_uses_with(pos_in)
        graph.erase_node(a)
    row_positions = _row_positions(graph, pos_in, mask_in)

    spec = CacheSpec(
        max_batch,
        max_len,
        positions_replaced=len(aranges),
        row_positions=row_positions,
        last_logits_only=last_logits_only,
    )
    buffers: dict[str, torch.Tensor] = {}
    for i, sd in enumerate(sdpas):
        q, k, v = sd.args[0], sd.args[1], sd.args[2]
        qv = _val(q)
        if not isinstance(qv, torch.Tensor) or qv.dim() != 4:
            raise CacheError(f"{sd.name}: expected a 4-D query [B, H, T, D]")
        if float(sdpa_arg(sd, 4, "dropout_p", 0.0) or 0.0) != 0.0:
            raise CacheError(f"{sd.name}: attention dropout is on; call model.eval() before compile()")
        seq = qv.shape[2] if seq_sym is None else seq_sym
        new_kv, shapes = [], []
        for which, src in (("k", k), ("v", v)):
            base = _kv_source(src, seq)
            bv = _val(base)
            if not isinstance(bv, torch.Tensor) or bv.dim() != 4 or qv.shape[1] % bv.shape[1]:
                raise CacheError(f"{sd.name}: could not find the per-head {which.upper()} tensor [B, Hkv, T, D]")
            shapes.append(bv)
            name = f"qqq_{which}_cache_{i}"
            # One spare slot: a read of all max_len slots is then never the whole (contiguous)
            # buffer, so export does not specialise the kernel choice on L == max_len.
            hkv, d = int(bv.shape[1]), int(bv.shape[3])
            # A converted cache keeps K d-major [B, Hkv, D, L] (the layout attention_bf16kv reads).
            slot_dim = 3 if cache_dtype is not None and which == "k" else 2
            shape = (max_batch, hkv, d, max_len + 1) if slot_dim == 3 else (max_batch, hkv, max_len + 1, d)
            buffers[name] = lazy_zeros(shape, cache_dtype or bv.dtype, device)
            with graph.inserting_before(sd):
                buf = graph.get_attr(name)
                rows = graph.call_function(aten.narrow.default, (buf, 0, first_row, batch))
                src_kv = base
                if cache_dtype is not None:
                    src_kv = graph.call_function(aten._to_copy.default, (base,), {"dtype": cache_dtype})
                    if slot_dim == 3:
                        src_kv = graph.call_function(aten.transpose.int, (src_kv, 2, 3))
                written = graph.call_function(aten.index_copy_.default, (rows, slot_dim, pos_in, src_kv))
                new_kv.append(graph.call_function(aten.narrow.default, (written, slot_dim, 0, kv_len)))
        kv_heads, head_dim = int(shapes[0].shape[1]), int(shapes[0].shape[3])
        itemsize = buffers[f"qqq_k_cache_{i}"].element_size()
        spec.layers.append({"sdpa": sd.name, "kv_heads": kv_heads, "head_dim": head_dim, "itemsize": itemsize})
        scale = sdpa_arg(sd, 6, "scale")
        with graph.inserting_before(sd):
            if cache_dtype is not None:
                new = _converted_cache_attention(graph, q, new_kv, mask, scale, head_dim, int(qv.shape[1]) != kv_heads)
            elif _f32_kernel_applies(device, qv, shapes[0]):
                # The C++ kernels (one token; several: the prefill kernel), else the same SDPA as below.
                new = graph.call_function(
                    torch.ops.qqq_cpu.attention_f32kv.default,
                    (
                        q,
                        new_kv[0],
                        new_kv[1],
                        mask,
                        float(scale) if scale is not None else head_dim**-0.5,
                        bf16_attention,
                    ),
                )
            else:
                new = graph.call_function(
                    aten.scaled_dot_product_attention.default,
                    (q, new_kv[0], new_kv[1], mask, 0.0, False),
                    {"scale": scale, "enable_gqa": int(qv.shape[1]) != kv_heads},
                )
        new.meta.update(sd.meta)
        sd.replace_all_uses_with(new)
        graph.erase_node(sd)

    # Logits: the first output, optionally only the last position's.
    logits = out_val[0] if isinstance(out_val, (tuple, list)) else out_val
    while isinstance(logits, (tuple, list)):
        logits = logits[0]
    if last_logits_only:
        found = _lm_head(logits)
        if found is not None:
            head, idx = found
            head_in = head.args[idx]
            with graph.inserting_before(head):
                last = graph.call_function(aten.slice.Tensor, (head_in, 1, -1, _MAX))
            head.update_arg(idx, last)
        else:
            logits = graph.call_function(aten.slice.Tensor, (logits, 1, -1, _MAX))
    graph.output(logits)
    for n in [n for n in graph.nodes if n.target is aten._assert_tensor_metadata.default]:
        graph.erase_node(n)  # export-time dtype checks; they keep the dead causal-mask code alive
    graph.set_codegen(torch.fx.graph.CodeGen())
    graph.eliminate_dead_code()
    # A shallow root that sees gm's modules and tensors plus the new buffers: the new
    # GraphModule shares the weights and gm itself is not touched.
    root = torch.nn.Module()
    root._modules = dict(gm._modules)
    root._parameters = dict(gm._parameters)
    root._buffers = {**gm._buffers, **buffers}
    root.__dict__.update({k: v for k, v in gm.__dict__.items() if isinstance(v, torch.Tensor)})
    new_gm = GraphModule(root, graph, class_name="QQQCachedLM")
    new_gm.meta.update(getattr(gm, "meta", {}))
    new_gm.recompile()
    return new_gm, spec


def reset_cache(gm: GraphModule) -> None:
    """Zero every KV buffer (not needed for correctness: stale slots are masked out)."""
    for name, buf in gm.named_buffers():
        if name.startswith(("qqq_k_cache_", "qqq_v_cache_")):
            buf.zero_()


__all__ = ["CacheError", "CacheSpec", "add_kv_cache", "graph_device", "lazy_zeros", "reset_cache"]
