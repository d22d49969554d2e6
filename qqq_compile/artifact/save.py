"""``save()``: write a :class:`~qqq_compile.runtime.compiled.CompiledModel` as an artifact folder."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.annotations import encode_extras, encode_linear, encode_node, node_annotation, replay_states
from qqq_compile.artifact import files
from qqq_compile.artifact.graphfile import GraphCodecError, encode_graph
from qqq_compile.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    SOURCE_GRAPH,
    STEP_DIR,
    TOKENIZER_DIR,
    WEIGHTS,
    config_digest,
    dtype_name,
    dumps,
    versions,
)
from qqq_compile.errors import ArtifactError
from qqq_compile.graph import get_attr
from qqq_compile.runtime.compiled import CompiledModel
from qqq_compile.runtime.generate import context_limit

_LINEAR = "__qqq_linear__/"  # key prefix of per-linear tensors ("/" never occurs in attribute names)


def save(
    compiled: CompiledModel,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    prepare_step: bool | None = None,
    max_len: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``compiled`` (and optionally its ``tokenizer``) to the folder ``path`` atomically.

    An existing artifact at ``path`` is replaced; any other existing folder or file is refused.

    ``prepare_step`` (default: yes, unless the environment sets ``QQQ_SAVE_STEP=0``) also
    ships the AOTInductor decode step in ``step/``: code only, for this CPU and torch, one
    row and ``max_len`` positions (default: the model's context, capped at 2048), so
    ``load()`` then ``generate()`` compiles nothing. It takes
    one AOT compile (a minute or more) unless a package of this graph is already in
    ``$QQQ_CACHE``; if it fails, the artifact is saved without it (with a warning) and the
    step is built on first use instead. On another CPU or torch the step is rebuilt once
    and kept beside the artifact.
    """
    if not isinstance(compiled, CompiledModel):
        raise ArtifactError(f"save expects a CompiledModel, got {type(compiled).__name__}")
    if not compiled.model_config or not compiled.model_class:
        raise ArtifactError(
            "only Hugging Face models can be saved: load() rebuilds the model from its HF config, and this "
            f"CompiledModel has none ({compiled.model_class or 'unknown model'})"
        )
    target = Path(path).expanduser().absolute()
    files.check_target(target)
    gm = compiled.graph_module
    bad = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    if bad:
        raise ArtifactError(
            f"the graph still calls modules {bad[:3]} (e.g. observers left by 'observe' without 'calibrate'); "
            "only fully rewritten graphs can be saved"
        )
    graph_tensors = graph_tensors_of(gm)
    layers, node_notes, linear_tensors = annotation_records(gm)
    unique, aliases = files.dedupe({**graph_tensors, **linear_tensors})
    report = compiled.report
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "model_class": compiled.model_class,
        "model_config": compiled.model_config,
        "model_dtype": _model_dtype(gm, graph_tensors),
        "input_names": compiled.input_names,
        "output_kind": compiled.output_kind,
        "compile_config": report.config,
        "pipeline": report.pipeline,
        "pass_configs": getattr(report, "pass_configs", []),
        # Without wall times: the same model, data and seed give byte-identical artifacts.
        "passes": [{k: v for k, v in vars(p).items() if k != "seconds"} for p in report.passes],
        "notes": [vars(n) for n in report.notes],
        "replay_state": replay_states(gm),
        "layers": layers,
        "graph_tensors": sorted(graph_tensors),
        "tensors": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in sorted(unique.items())},
        "aliases": dict(sorted(aliases.items())),
        "graph_ops": op_counts(gm),
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
    }
    try:
        graph = {**encode_graph(gm, node_notes), "model_config_sha256": config_digest(compiled.model_config)}
        graph_text: str | None = json.dumps(graph, separators=(",", ":"), sort_keys=True)
        manifest["graph_file"] = {"name": GRAPH, "torch": torch.__version__}
    except GraphCodecError as e:  # load() will capture and replay instead
        graph_text = None
        manifest["graph_file"] = None
        manifest["graph_file_skipped"] = str(e)

    if prepare_step is None:
        prepare_step = os.environ.get("QQQ_SAVE_STEP", "1") != "0"
    step_len = max_len or compiled.default_max_len()
    limit = context_limit(compiled.model_config)
    if limit is not None and step_len > limit:
        raise ArtifactError(f"max_len={step_len} exceeds this model's context of {limit} positions; use <= {limit}")

    def fill(tmp: Path) -> None:
        manifest["weights_file"] = files.write_tensors(unique, tmp / WEIGHTS)
        # After the weights: building the step makes fused projections share storage.
        step_dir, shown = tmp / STEP_DIR, target / STEP_DIR
        manifest["decode_step"] = _ship_step(compiled, step_dir, shown, step_len, progress) if prepare_step else None
        if graph_text is not None:
            (tmp / GRAPH).write_text(graph_text, encoding="utf-8")
            manifest["graph_file"]["sha256"] = hashlib.sha256(graph_text.encode()).hexdigest()
        if compiled.source_graph:
            (tmp / SOURCE_GRAPH).write_text(compiled.source_graph, encoding="utf-8")
            manifest["source_graph_file"] = SOURCE_GRAPH
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / MANIFEST).write_text(dumps(manifest), encoding="utf-8")

    files.write_atomically(target, fill)
    return target


def _ship_step(
    compiled: CompiledModel, folder: Path, shown: Path, max_len: int, progress: bool
) -> dict[str, Any] | None:
    """The manifest's ``decode_step`` entry after putting the step's package in ``folder``;
    None (with a warning) when it cannot be built here."""
    from qqq_compile.runtime.steps import ship_step

    try:
        info = ship_step(
            compiled.graph_module,
            folder,
            max_batch=1,
            max_len=max_len,
            reuse=compiled.package_dirs(),
            progress=progress,
            shown_as=shown,
        )
    except Exception as e:  # noqa: BLE001 - the artifact is still whole without it
        warnings.warn(
            f"qqq_compile: the decode step could not be built ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            "the artifact is saved without it and generate() builds it on first use",
            RuntimeWarning,
            stacklevel=3,
        )
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return {"folder": STEP_DIR, **{k: v for k, v in info.items() if k != "compiled"}}


def graph_tensors_of(gm: GraphModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor the graph (and nested graph modules) reads through ``get_attr``, by target."""
    out: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        obj = get_attr(gm, n.target)
        if isinstance(obj, torch.Tensor):
            out[prefix + n.target] = obj.detach()
        elif isinstance(obj, GraphModule):
            out.update(graph_tensors_of(obj, f"{prefix}{n.target}."))
        else:
            raise ArtifactError(f"graph attribute '{prefix}{n.target}' is a {type(obj).__name__}, not a tensor")
    return out


def annotation_records(gm: GraphModule) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, torch.Tensor]]:
    """``(per-linear report records, node name → annotation JSON, tensors by key)``.

    Linears are keyed by module name and occurrence (``load()`` re-attaches them to a
    replayed graph that way); a node's entry points at its linear record by index.
    """
    layers: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    seen: collections.Counter[str] = collections.Counter()
    for n in gm.graph.nodes:
        ann = node_annotation(n)
        if ann.linear is None:
            if (rec := encode_node(n, f"{_LINEAR}node/{n.name}/", tensors)) is not None:
                notes[n.name] = rec
            continue
        li = ann.linear
        idx, seen[li.fqn] = seen[li.fqn], seen[li.fqn] + 1
        rec = encode_linear(li, f"{_LINEAR}{li.fqn}#{idx}/", tensors, ann.smooth)
        layers.append({**rec, "occurrence": idx})
        notes[n.name] = {"layer": len(layers) - 1, **encode_extras(ann)}
    return layers, notes, tensors


def _model_dtype(gm: GraphModule, graph_tensors: dict[str, torch.Tensor]) -> str:
    """The float dtype holding most elements (the dtype the model was captured in).

    Weights ``cast_float`` stored in another dtype do not count: the skeleton must be
    built in the dtype the graph computes in, not in the storage dtype of lm_head.
    """
    cast = {
        n.target
        for n in gm.graph.nodes
        if n.op == "get_attr" and n.users and all(node_annotation(u).float_cast for u in n.users)
    }
    by_dtype: collections.Counter[str] = collections.Counter()
    for name, t in graph_tensors.items():
        if t.is_floating_point() and name not in cast:
            by_dtype[dtype_name(t.dtype)] += t.numel()
    return by_dtype.most_common(1)[0][0] if by_dtype else "float32"


def op_counts(gm: GraphModule) -> dict[str, int]:
    counts = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items()))


def _save_method(self: CompiledModel, path: str, tokenizer: Any = None, **options: Any) -> None:
    """``CompiledModel.save``: :func:`save` as a method (same keyword options)."""
    save(self, path, tokenizer=tokenizer, **options)


_save_method.__doc__ = CompiledModel.save.__doc__
CompiledModel.save = _save_method  # the upper layer provides the method (see compiled.py)
