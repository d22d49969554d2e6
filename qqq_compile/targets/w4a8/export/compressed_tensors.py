"""Export a compiled model as a Hugging Face folder in the compressed-tensors W4A8 format.

This module maps the lowered graph onto the Hugging Face model class (tensor names, tied
weights, what the class cannot express) and writes the folder; the format itself (int4
packing, our two-level scales as compressed-tensors' single level, ``quantization_config``)
is :mod:`.ct_format`, the sharded safetensors writer :mod:`.shards`. The layout is the
one compressed-tensors 0.20 itself writes for its ``W4A8`` preset, checked tensor by
tensor in ``tests/export/test_compressed_tensors.py``.

The int8 lm_head and embedding (the ``int8_head`` pass, on by default) are an in-process
runtime optimisation: vLLM's compressed-tensors W4A8 scheme takes no quantized lm_head,
so the checkpoint carries their exact dequantized values (``int8 * row scale``, in the
checkpoint's float dtype) as the standard ``lm_head.weight`` and
``model.embed_tokens.weight``, ``lm_head`` stays in ``ignore``, and a tied head and
embedding stay one tensor (``tie_word_embeddings`` kept). Only the head's per-token int8
activations are not carried: a runtime loading the folder runs the head in float.
``qqq_export.json`` lists the tensors written that way (``"int8_dequantized"``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.export.shards import Item, write_safetensors
from qqq_compile.graph import get_attr, linear_sites, module_fqn
from qqq_compile.targets.w4a8.export import (
    ExportError,
    QLinear,
    check_qqq_ops,
    float_int8_head,
    qqq_linears,
    whole_graph,
)
from qqq_compile.targets.w4a8.export.ct_format import (  # noqa: F401 - pack_int4_to_int32, CTWeight: part of this module's API
    CT_VERSION,
    FORMATS,
    CTWeight,
    export_group_size,
    pack_int4_to_int32,
    quantization_config,
    to_ct_weight,
)

MANIFEST = "qqq_export.json"
# Lifted by torch.export for tensors created inside forward(); the HF code recreates them.
_CONSTANT_PREFIXES = ("_tensor_constant", "_lifted_tensor_constant", "lifted_tensor")


# ----------------------------------------------------------------------------- HF skeleton


def _hf_skeleton(compiled: Any) -> tuple[Any, torch.nn.Module]:
    """The model's Hugging Face config and an empty (meta) model to read names and shapes from."""
    import transformers

    if not compiled.model_config or not compiled.model_class:
        raise ExportError(
            "export_compressed_tensors needs a model compiled from a Hugging Face causal LM "
            "(the compiled model carries no Hugging Face config)"
        )
    d = dict(compiled.model_config)
    model_type = d.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ExportError(f"transformers does not know model_type={model_type!r}")
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(d)
    cls = getattr(transformers, compiled.model_class, None)
    if cls is None:
        raise ExportError(f"transformers has no class {compiled.model_class}; cannot name the exported tensors")
    with torch.device("meta"):
        model = cls(cfg)
    cfg.architectures = [compiled.model_class]
    return cfg, model


def _users(gm: GraphModule, target: str) -> str:
    names = [
        f"{u.name} ({u.target})" for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users
    ]
    return ", ".join(names) or "nothing"


def _online_rotation(gm: GraphModule, target: str) -> Node | None:
    """The node a rotation pass marked as an online Hadamard that ``target`` feeds, if any."""
    # The whole downstream of the tensor, however long the chain (a Kronecker chain's first
    # factor is 7 nodes from the node the pass annotates), each node once.
    frontier = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]
    seen: set[Node] = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if node_annotation(n).online_hadamard is not None:
            return n
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "qqq":
            continue  # past a kernel call it is another computation, not this tensor's chain
        frontier.extend(n.users)
    return None


def _role_keys(gm: GraphModule, state: dict[str, Any]) -> dict[str, list[str]]:
    """HF keys of each ``get_attr`` target, by how the graph uses it: a linear's weight or
    bias is ``<module>.weight``/``.bias``, an embedding table ``<module>.weight``. This
    names tensors that a pass re-registered (an untied ``lm_head``) and splits a tied
    tensor into its roles."""
    roles: dict[str, list[str]] = {}

    def add(attr: Any, key: str) -> None:
        if isinstance(attr, Node) and attr.op == "get_attr" and key in state:
            roles.setdefault(attr.target, []).append(key)

    for site in linear_sites(gm):
        fqn = module_fqn(site.node)
        add(site.weight, f"{fqn}.weight")
        add(site.bias, f"{fqn}.bias")
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default:
            add(n.args[0], f"{module_fqn(n)}.weight")
    return roles


def _collect(
    gm: GraphModule, skeleton: torch.nn.Module, linears: list[QLinear]
) -> tuple[dict[str, torch.Tensor], dict[str, QLinear]]:
    """Float tensors by HF state_dict key, and quantized linears by weight key."""
    state = skeleton.state_dict(keep_vars=True)
    buffers = {n for n, _ in skeleton.named_buffers()}
    modules = dict(skeleton.named_modules())
    roles = _role_keys(gm, state)
    consumed: set[str] = set()
    floats: dict[str, torch.Tensor] = {}
    quant: dict[str, QLinear] = {}
    for ql in linears:
        mod = modules.get(ql.fqn)
        if not isinstance(mod, torch.nn.Linear):
            kind = "no module" if mod is None else f"a {type(mod).__name__}"
            raise ExportError(
                f"quantized linear {ql.fqn} is {kind} in {type(skeleton).__name__}; compressed-tensors only "
                "quantizes torch.nn.Linear modules (export this model with export_onnx instead)"
            )
        if tuple(mod.weight.shape) != (ql.packed.out_features, ql.packed.in_features):
            raise ExportError(
                f"{ql.fqn}: packed weight is {ql.packed.out_features}x{ql.packed.in_features}, "
                f"the Hugging Face module expects {tuple(mod.weight.shape)}"
            )
        quant[f"{ql.fqn}.weight"] = ql
        a = ql.node.args
        consumed.update(n.target for n in (*a, *ql.node.kwargs.values()) if getattr(n, "op", None) == "get_attr")
        if ql.bias is not None:
            if f"{ql.fqn}.bias" not in state:
                raise ExportError(f"{ql.fqn} has a bias in the compiled graph but not in the Hugging Face model")
            floats[f"{ql.fqn}.bias"] = ql.bias
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in consumed:
            continue
        t = node.target
        keys = roles.get(t) or ([t] if t in state else [])
        for key in keys:
            floats[key] = get_attr(gm, t)
        if keys or t in buffers or t.startswith(_CONSTANT_PREFIXES):
            continue  # else: non-persistent buffer (rotary inv_freq...) or lifted constant, HF recomputes it
        rot = _online_rotation(gm, t)
        if rot is not None:
            raise ExportError(
                f"the compiled graph applies an online Hadamard rotation ({rot.name}, width "
                f"{node_annotation(rot).online_hadamard}) that Hugging Face's {type(skeleton).__name__} has no op for; "
                "compile with Rotate(online_down_proj=False) to export to compressed-tensors, or use export_onnx"
            )
        raise ExportError(
            f"the compiled graph holds a tensor {t!r} that no Hugging Face {type(skeleton).__name__} has "
            f"(used by {_users(gm, t)}): the graph computes something the model class cannot express. "
            "Compile without the pass that added it to export this model"
        )
    return floats, quant


def _resolve_ties(
    skeleton: torch.nn.Module, floats: dict[str, torch.Tensor], quant: dict[str, QLinear], tie: bool
) -> tuple[dict[str, torch.Tensor], bool, set[str]]:
    """Map tied parameters (torch.export names a shared tensor by either alias) to HF keys
    and decide whether the exported model stays tied. Returns the float tensors by key,
    the tie flag and the aliases left out because they stay tied to a written key."""
    groups: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = dict(floats)
    omitted: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        given = {n: out.pop(n) for n in names if n in out}
        distinct = []
        for t in given.values():
            if not any(t is d or (t.shape == d.shape and torch.equal(t, d)) for d in distinct):
                distinct.append(t)
        quantized = [n for n in names if n in quant]
        if not distinct and not quantized:
            continue  # reported as missing below
        if len(distinct) == 1 and not quantized:
            out[names[0]] = distinct[0]  # still tied: write the canonical name only, as HF does
            omitted.update(names[1:])
            continue
        tie = False
        if len(distinct) == 1:
            for n in names:
                if n not in quantized:
                    out[n] = distinct[0]
        else:
            out.update(given)
    if not tie:
        omitted.clear()
    return out, tie, omitted


def _cast_dequantized(
    gm: GraphModule, floats: dict[str, torch.Tensor], dequantized: dict[str, str]
) -> tuple[dict[str, torch.Tensor], torch.dtype, list[str]]:
    """The model's float dtype (that of the float tensors the graph holds, the dequantized
    int8 tables aside), and ``floats`` with those tables cast to it (one tensor per table,
    so that ties survive). Also returns the keys holding dequantized tables."""
    deq = {id(get_attr(gm, name)): get_attr(gm, name) for name in dequantized}
    counts = Counter(t.dtype for t in floats.values() if t.is_floating_point() and id(t) not in deq)
    model_dtype = counts.most_common(1)[0][0] if counts else torch.float32
    cast = {i: t.to(model_dtype) for i, t in deq.items()}
    keys = [k for k, t in floats.items() if id(t) in deq]
    return {k: cast.get(id(t), t) for k, t in floats.items()}, model_dtype, keys


# ----------------------------------------------------------------------------- files


def _linear_item(ql: QLinear, key: str, group_size: int, fmt: str, scale_dtype: torch.dtype, manifest: dict) -> Item:
    p = ql.packed
    n, k = p.out_features, p.in_features
    g = 1 if group_size <= 0 else k // group_size
    base = key.removesuffix("weight")
    q_bytes = n * k if fmt == "int-quantized" else 4 * n * math.ceil(k / 8) + 16

    def make() -> dict[str, torch.Tensor]:
        w = to_ct_weight(p, group_size, scale_dtype)
        manifest[ql.fqn] = {
            "exact": w.exact,
            "sqnr_db": None if math.isinf(w.sqnr_db) else round(w.sqnr_db, 2),
            "group_size": p.group_size,
            "group_scale_dtype": p.group_scale_dtype,
        }
        if fmt == "int-quantized":
            return {key: w.q, key + "_scale": w.scale}
        shape = torch.tensor([n, k], dtype=torch.int64)
        return {base + "weight_packed": pack_int4_to_int32(w.q), key + "_scale": w.scale, base + "weight_shape": shape}

    return Item(q_bytes + n * g * scale_dtype.itemsize, make)


def export_compressed_tensors(
    compiled: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    format: str = "int-quantized",  # noqa: A002 - the compressed-tensors key
    scale_dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``compiled`` (a :class:`~qqq_compile.CompiledModel` of a HF causal LM) to
    ``out_dir`` as a compressed-tensors W4A8 checkpoint: config.json with
    ``quantization_config``, safetensors, the tokenizer's files if given, and
    ``qqq_export.json`` (per-linear SQNR of the exported weights against ours).

    ``scale_dtype`` defaults to the model's float dtype, as llm-compressor writes it.
    Refuses (:class:`ExportError`) graphs that hold computation the HF model class cannot
    express. The folder is written in a temporary sibling and renamed into place.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    gm: GraphModule = whole_graph(compiled)
    check_qqq_ops(gm, "compressed-tensors")
    gm, dequantized = float_int8_head(gm)  # the int8 head and embedding as float (see above)
    linears = qqq_linears(gm)
    if not linears:
        raise ExportError("the compiled graph has no torch.ops.qqq linear: nothing quantized to export")
    cfg, skeleton = _hf_skeleton(compiled)
    floats, quant = _collect(gm, skeleton, linears)
    floats, model_dtype, int8_keys = _cast_dequantized(gm, floats, dequantized)
    floats, tie, tied_aliases = _resolve_ties(skeleton, floats, quant, bool(getattr(cfg, "tie_word_embeddings", False)))
    scale_dtype = scale_dtype or model_dtype

    g_out = export_group_size(linears)
    items: list[Item] = []
    schemes: dict[int, list[str]] = {}
    manifest: dict[str, Any] = {}
    for key in skeleton.state_dict(keep_vars=True):
        if key in quant:
            ql = quant[key]
            g = g_out if ql.packed.group_scale is not None else -1
            items.append(_linear_item(ql, key, g, format, scale_dtype, manifest))
            schemes.setdefault(g, []).append(ql.fqn)
        elif key in floats:
            t = floats[key]
            items.append(Item(t.numel() * t.element_size(), lambda key=key, t=t: {key: t}))
        elif key not in tied_aliases:
            raise ExportError(f"the compiled graph has no tensor for {key!r}; cannot write a complete checkpoint")

    linear_names = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {ql.fqn for ql in linears}
    ignore = [n for n in linear_names if n not in quantized]
    qcfg = quantization_config(schemes, ignore, format)
    cfg.tie_word_embeddings = tie

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass overwrite=True or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg.save_pretrained(tmp)
        cj = json.loads((tmp / "config.json").read_text())
        cj["quantization_config"] = qcfg
        cj["tie_word_embeddings"] = tie
        cj["dtype"] = str(model_dtype).removeprefix("torch.")
        cj.pop("torch_dtype", None)
        cj["use_cache"] = True  # export ran without a KV cache; serving wants one
        (tmp / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
        write_safetensors(items, tmp, max_shard_size, progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sq = [v["sqnr_db"] for v in manifest.values() if v["sqnr_db"] is not None]
        summary = {
            "format": format,
            "group_size_written": g_out,
            "scale_dtype": str(scale_dtype).removeprefix("torch."),
            "all_exact": all(v["exact"] for v in manifest.values()),
            "min_weight_sqnr_db": min(sq) if sq else None,
            "int8_dequantized": sorted(k for k in int8_keys if k not in tied_aliases),
            "linears": manifest,
        }
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
