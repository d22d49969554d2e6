"""Write a model compiled for the GGUF target as a GGUF file stock llama.cpp loads.

The file holds exactly what the lowered graph computes with: the Q4_0 blocks of every
lowered linear (``qqq::q4_0_linear``: codes and fp16 scales as GPTQ chose them, nothing
re-rounded), the head and embedding tables of the ``gguf_head`` pass in their GGUF types
(one ``token_embd`` when the head reads the same table: llama.cpp then reuses it for the
output), the norm weights (F32; after ``rotate`` they are ones, the weights folded into
the linears), biases (F32) and linears kept in float (F32). Tensor names and the
architecture metadata follow llama.cpp's loader; for ``llama`` the q/k rows are permuted
into llama.cpp's RoPE layout as its converter does (a row permutation: the blocks move
whole). The tokenizer comes from :mod:`.vocab`.

Before writing, every tensor the graph reads must have a place in llama.cpp's graph of the
architecture, and nothing llama.cpp lacks may be in the graph (an online Hadamard, a W4A8
op): otherwise :class:`GGUFExportError` names it, so no file computes something else than
the compiled model. The file is written with gguf-py's ``GGUFWriter`` to a temporary name
and renamed into place.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.errors import QQQError
from qqq_compile.export import check_new_file
from qqq_compile.graph import get_attr, info, linear_sites
from qqq_compile.graph.norms import find_norm
from qqq_compile.targets.gguf.formats import PackedQ4_0, PackedQ8_0
from qqq_compile.targets.gguf.ops import F16_LINEAR, Q4_0_LINEAR, Q8_0_LINEAR
from qqq_compile.targets.gguf.vocab import read_vocab
from qqq_compile.targets.registry import lowered_linear_ops


class GGUFExportError(QQQError, ValueError):
    """The compiled model cannot be written as a GGUF file llama.cpp computes exactly."""


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` maps onto a llama.cpp architecture."""

    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # q/k rows into llama.cpp's (interleaved) RoPE layout
    biases: frozenset[str] = field(default_factory=frozenset)  # block tensors llama.cpp loads a bias for


ARCHS = {
    "llama": Arch(
        "llama", True, frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
    ),
    "qwen2": Arch("qwen2", False, frozenset({"attn_q", "attn_k", "attn_v"})),
}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(module: str) -> str | None:
    """llama.cpp's tensor name (without ``.weight``) of a Hugging Face module, or None."""
    m = _LAYER.match(module)
    if m:
        role = _BLOCK.get(m.group(2))
        return None if role is None else f"blk.{m.group(1)}.{role}"
    return _TOP.get(module)


# ----------------------------------------------------------------------------- metadata


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GGUFExportError(
            f"RoPE scaling '{kind}' is not supported by the GGUF export yet (llama.cpp needs its own parameters "
            "or a rope_freqs tensor for it); only unscaled RoPE is written"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise GGUFExportError("the model config names no rope_theta; llama.cpp needs the RoPE base")
    return float(theta)


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _add_metadata(w: Any, arch: Arch, cfg: dict[str, Any], name: str) -> None:
    import gguf

    if arch.gguf == "qwen2" and cfg.get("use_sliding_window"):
        raise GGUFExportError("Qwen2 with use_sliding_window=True is not supported by the GGUF export")
    w.add_name(name)
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    if cfg.get("head_dim") is not None:
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))
    if arch.gguf == "llama":
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(_head_dim(cfg))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------- tensors


@dataclass
class Tensor:
    """One GGUF tensor: its data as gguf-py takes it and its llama.cpp type."""

    data: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's ``LlamaModel.permute`` of the rows of ``t`` ``[N, ...]``."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


class _Collector:
    """Gathers the GGUF tensors of a lowered graph and checks nothing is left over."""

    def __init__(self, gm: GraphModule, arch: Arch, cfg: dict[str, Any]):
        import gguf

        self.gm, self.arch, self.cfg, self.q = gm, arch, cfg, gguf.GGMLQuantizationType
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()  # get_attr targets accounted for

    def attr(self, n: Any) -> torch.Tensor:
        if not (isinstance(n, Node) and n.op == "get_attr"):
            raise GGUFExportError(f"expected a stored tensor, found {n}")
        self.used.add(n.target)
        return get_attr(self.gm, n.target).detach()

    def rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` with its rows in llama.cpp's order for tensor ``name``."""
        if self.arch.permute_qk and re.search(r"\.attn_[qk]$", name):
            heads = self.cfg["num_attention_heads"]
            if name.endswith("attn_k"):
                heads = self.cfg.get("num_key_value_heads") or heads
            return _permute(t, int(heads))
        return t

    def put(self, name: str, data: torch.Tensor, qtype: Any) -> None:
        if name in self.out:
            raise GGUFExportError(f"two tensors of the graph map to {name}")
        arr = data.contiguous().numpy()
        self.out[name] = Tensor(arr, qtype)

    def linear(self, module: str, packed: Any, bias: Any) -> None:
        base = self.name(module)
        if isinstance(packed, PackedQ4_0):
            self.put(base + ".weight", self.rows(base, packed.blocks()), self.q.Q4_0)
        elif isinstance(packed, PackedQ8_0):
            self.put(base + ".weight", self.rows(base, packed.blocks()), self.q.Q8_0)
        elif isinstance(packed, torch.Tensor) and packed.dtype == torch.float16:
            self.put(base + ".weight", self.rows(base, packed), self.q.F16)
        else:
            self.put(base + ".weight", self.rows(base, packed.float()), self.q.F32)
        if bias is not None:
            role = base.rsplit(".", 1)[-1]
            if role not in self.arch.biases:
                raise GGUFExportError(
                    f"{module} has a bias, which llama.cpp's {self.arch.gguf} does not load for {role}"
                )
            self.put(base + ".bias", self.rows(base, self.attr(bias).float()), self.q.F32)

    def name(self, module: str) -> str:
        base = gguf_name(module)
        if base is None:
            raise GGUFExportError(
                f"{module} has no place in llama.cpp's {self.arch.gguf} architecture (known: q/k/v/o and "
                "gate/up/down projections of model.layers.N, the norms, embed_tokens, lm_head)"
            )
        return base


def _check_graph(gm: GraphModule) -> None:
    """Refuse graphs that compute what llama.cpp's graph does not."""
    for n in gm.graph.nodes:
        if node_annotation(n).online_hadamard is not None:
            raise GGUFExportError(
                f"node {n.name} applies an online Hadamard transform, which stock llama.cpp has no op for: compile "
                "with rotate(online_down_proj=False) (the GGUF target's pass lists do this)"
            )
    ours = {Q4_0_LINEAR, Q8_0_LINEAR, F16_LINEAR}
    other = sorted({str(n.target) for n in gm.graph.nodes if n.target in set(lowered_linear_ops()) - ours})
    if other:
        raise GGUFExportError(f"the graph calls {', '.join(other)}: it was lowered for another target than gguf")


def _collect(gm: GraphModule, arch: Arch, cfg: dict[str, Any]) -> dict[str, Tensor]:
    c = _Collector(gm, arch, cfg)
    head_names: dict[str, str] | None = None
    emb_names: dict[str, str] | None = None
    for n in gm.graph.nodes:
        ann = node_annotation(n).int8_head or {}
        if n.op != "call_function":
            continue
        if n.target in (Q4_0_LINEAR, Q8_0_LINEAR) and info(n) is not None and not ann:
            c.attr(n.args[1]), c.attr(n.args[2])
            c.linear(info(n).fqn, info(n).packed, n.args[3])
        elif ann.get("replaced") == "linear":  # the gguf_head pass's lm_head
            head_names = {k: ann[k] for k in ("w", "qs", "d") if k in ann}
            packed = _table(c, n.args[1:-1], ann["format"])
            c.linear(ann["fqn"], packed, n.args[-1])
        elif ann.get("replaced") == "embedding":
            names = {k: ann[k] for k in ("w", "qs", "d") if k in ann}
            if emb_names is not None and names != emb_names:
                raise GGUFExportError("the graph reads two different token embedding tables")
            emb_names = names
            for t in names.values():
                c.used.add(t)
    for site in linear_sites(gm):  # linears kept in float (QuantConfig.skip)
        li = info(site.node)
        if li is not None and li.lowered:
            continue
        c.linear(li.fqn if li else site.name, c.attr(site.weight).float(), site.bias)
    if emb_names is None:
        raise GGUFExportError("no token embedding found: compile with the gguf target's head pass (int8_head)")
    emb = _table(c, [gm.graph.find_nodes(op="get_attr", target=t)[0] for t in emb_names.values()], _fmt(emb_names))
    c.put("token_embd.weight", emb.blocks() if hasattr(emb, "blocks") else emb, _qtype(c, emb))
    if head_names is not None and head_names == emb_names:
        del c.out["output.weight"]  # tied: llama.cpp reads token_embd for the output
    _norms(c, gm)
    _leftover(c, gm)
    return c.out


def _fmt(names: dict[str, str]) -> str:
    return "f16" if "w" in names else ("q8_0" if names["qs"].endswith("_q8_0_qs") else "q4_0")


def _table(c: _Collector, args: Any, fmt: str) -> Any:
    if fmt == "f16":
        return c.attr(args[0])
    qs, d = c.attr(args[0]), c.attr(args[1])
    return PackedQ8_0(qs, d, qs.shape[1]) if fmt == "q8_0" else PackedQ4_0(qs, d, qs.shape[1] * 2)


def _qtype(c: _Collector, t: Any) -> Any:
    return c.q.Q8_0 if isinstance(t, PackedQ8_0) else c.q.Q4_0 if isinstance(t, PackedQ4_0) else c.q.F16


def _norms(c: _Collector, gm: GraphModule) -> None:
    eps = float(c.cfg["rms_norm_eps"])
    seen = set()
    for n in gm.graph.nodes:
        norm = find_norm(gm, n) if n.op == "call_function" else None
        if norm is None or norm.weight.target in seen:
            continue  # find_norm also answers for views of a norm's output
        seen.add(norm.weight.target)
        module = re.sub(r"\.weight$", "", norm.weight.target)
        if norm.kind != "rmsnorm":
            raise GGUFExportError(f"{module} is a {norm.kind}; llama.cpp's {c.arch.gguf} uses RMSNorm")
        if norm.eps is not None and not math.isclose(norm.eps, eps, rel_tol=1e-6):
            raise GGUFExportError(f"{module} uses eps={norm.eps}, the config rms_norm_eps={eps}")
        c.put(c.name(module) + ".weight", c.attr(norm.weight).float(), c.q.F32)


def _leftover(c: _Collector, gm: GraphModule) -> None:
    """Every stored tensor the graph reads must be in the file, except RoPE's inv_freq (which
    must be the plain RoPE of the config's base, what llama.cpp recomputes)."""
    left = []
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target in c.used:
            continue
        t = get_attr(gm, n.target)
        if n.target.endswith("rotary_emb.inv_freq"):
            dim = _head_dim(c.cfg)
            ref = 1.0 / (_rope_theta(c.cfg) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            if not torch.allclose(t.float(), ref, rtol=1e-5):
                raise GGUFExportError("the model's RoPE frequencies are not plain RoPE of its rope_theta")
            continue
        if isinstance(t, torch.Tensor) and t.numel() <= 1:
            continue  # scalar constants of the graph's own arithmetic
        left.append(f"{n.target} {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if left:
        raise GGUFExportError(
            f"the graph reads tensors llama.cpp's {c.arch.gguf} graph has no place for: {', '.join(left[:6])}"
        )


# ----------------------------------------------------------------------------- writing


def export_gguf(
    compiled: Any,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write ``compiled`` (a model compiled with ``quant.target="gguf"``) to the GGUF file ``out``.

    ``tokenizer``: the model's Hugging Face tokenizer (required: the file carries it);
    ``name``: ``general.name`` (default: the model's name or path); ``tokenizer_pre``:
    llama.cpp's pre-tokenizer name when llama.cpp's table does not know the tokenizer's.
    Refuses an existing ``out`` unless ``overwrite``. Returns the path written.
    """
    import gguf

    path = check_new_file(out, overwrite)
    cfg = dict(compiled.model_config or {})
    model_type = cfg.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise GGUFExportError(
            f"model_type {model_type!r} has no GGUF mapping: the export knows {', '.join(sorted(ARCHS))} (their "
            "tensor names, RoPE layout and metadata in llama.cpp); another architecture needs its entry in "
            "qqq_compile.targets.gguf.export.ARCHS"
        )
    vocab = read_vocab(tokenizer, int(cfg["vocab_size"]), tokenizer_pre)
    gm = compiled.graph_module
    _check_graph(gm)
    tensors = _collect(gm, arch, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch.gguf)
        _add_metadata(w, arch, cfg, name or cfg.get("_name_or_path") or compiled.model_class or model_type)
        vocab.add_to(w)
        for tname, t in tensors.items():
            w.add_tensor(tname, t.data, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["ARCHS", "Arch", "GGUFExportError", "export_gguf", "gguf_name"]
