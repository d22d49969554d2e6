"""``load()``: rebuild a :class:`~qqq_compile.runtime.compiled.CompiledModel` from an artifact folder.

Two ways, same result: read the lowered graph from the graph file (fast: no model, no
capture) or, when there is none or it cannot be read here (written by another torch
release, a target this torch lacks), rebuild the model from its config, capture it and
replay the saved passes (:mod:`qqq_compile.artifact.replay`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.annotations import GraphAnnotation, decode_node, set_node_annotation
from qqq_compile.artifact import files
from qqq_compile.artifact.graphfile import GraphCodecError, decode_graph, restore_shapes
from qqq_compile.artifact.manifest import GRAPH, MANIFEST, STEP_DIR, config_digest, read_manifest
from qqq_compile.artifact.replay import check_rebuilt, example_inputs, rebuild_by_replay, saved_pass_specs
from qqq_compile.compiler.pipeline import readable_graph
from qqq_compile.compiler.report import Note, PassRecord, Report
from qqq_compile.errors import ArtifactError
from qqq_compile.runtime.compiled import CompiledModel

REBUILD = ("auto", "graph", "replay")


def load(path: str | os.PathLike, *, verify: bool = True, rebuild: str = "auto") -> CompiledModel:
    """Rebuild the :class:`CompiledModel` saved at ``path`` (no calibration data needed).

    ``verify`` checks the SHA-256 of the saved files against the manifest. ``rebuild``:
    ``"auto"`` reads the saved graph when this torch can, else captures the model from
    its config and replays the passes; ``"graph"`` only reads the graph (an error when it
    cannot); ``"replay"`` always captures and replays. ``.rebuilt_by`` on the result says
    which way was taken (``"graph"`` or ``"replay"``).
    """
    if rebuild not in REBUILD:
        raise ValueError(f"rebuild={rebuild!r} is not known; use one of {REBUILD}")
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    tensors = files.read_tensors(root, manifest, verify)
    specs = saved_pass_specs(manifest)
    gm, why, source_graph = None, "", None
    if rebuild != "replay":
        gm, why = _from_graph_file(root, manifest, tensors, verify)
        if gm is None and rebuild == "graph":
            raise ArtifactError(f"cannot read the graph of {root}: {why}; load it with rebuild='replay'")
        if gm is not None and manifest.get("source_graph_file"):
            src = root / manifest["source_graph_file"]
            source_graph = src.read_text(encoding="utf-8") if src.is_file() else None
    rebuilt_by = "graph"
    output_kind = manifest.get("output_kind", "hf")
    if gm is None:
        gm, captured = rebuild_by_replay(root, manifest, tensors, specs)
        rebuilt_by, output_kind = "replay", manifest.get("output_kind", captured.output_kind)
        source_graph = readable_graph(captured.graph_module) if source_graph is None else source_graph
    report = Report(
        passes=[_record(PassRecord, p) for p in manifest.get("passes", [])],
        notes=[_record(Note, n) for n in manifest.get("notes", [])],
        config=manifest.get("compile_config", {}),
        pipeline=list(manifest.get("pipeline", [])),
        pass_configs=specs,
    )
    compiled = CompiledModel(
        gm,
        input_names=list(manifest.get("input_names") or ["input_ids"]),
        output_kind=output_kind,
        report=report,
        model_config=manifest["model_config"],
        model_class=manifest["model_class"],
        source_graph=source_graph,
    )
    compiled.rebuilt_by = rebuilt_by
    compiled.rebuild_note = why or None  # why the graph file was not used, if it was not
    # The decode step lives beside the artifact: the one save() shipped, and those rebuilt
    # for another CPU or torch (in $QQQ_CACHE/aot instead when the folder is read-only).
    step = manifest.get("decode_step") or {}
    compiled.aot_dir = str(root.absolute() / str(step.get("folder", STEP_DIR)))
    if step.get("max_len"):
        compiled.step_size = (int(step.get("max_batch", 1)), int(step["max_len"]))
    return compiled


def _same_release(a: str, b: str) -> bool:
    """Same torch major.minor.patch (local build tags such as ``+cpu`` ignored)."""
    return a.split("+")[0] == b.split("+")[0]


def _from_graph_file(
    root: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], verify: bool
) -> tuple[GraphModule | None, str]:
    """``(graph, "")`` from the graph file, or ``(None, why not)``."""
    gf = manifest.get("graph_file")
    if not gf:
        return None, manifest.get("graph_file_skipped") or "the artifact has no graph file (format 1.0)"
    if not _same_release(str(gf.get("torch")), torch.__version__):
        return None, f"its graph file was written by torch {gf.get('torch')}, this is torch {torch.__version__}"
    path = root / gf.get("name", GRAPH)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete, save it again")
    text = path.read_bytes()
    if verify and gf.get("sha256") and hashlib.sha256(text).hexdigest() != gf["sha256"]:
        raise ArtifactError(f"{path} does not match the checksum in the manifest: the file is corrupt")
    try:
        graph = json.loads(text)
        if graph.get("model_config_sha256") != config_digest(manifest["model_config"]):
            # Edited after saving: rebuild from the config, which checks it against the tensors.
            return None, f"the model config in {MANIFEST} is not the one the graph was saved with"
        gm, notes = decode_graph(graph, tensors)
    except GraphCodecError as e:
        return None, str(e)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be parsed ({type(e).__name__}: {e}); the artifact is corrupt") from e
    layers = manifest["layers"]
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, rec in notes.items():
        set_node_annotation(by_name[name], decode_node(rec, tensors, layers))
    gm.meta["qqq"] = GraphAnnotation(dict(manifest.get("replay_state") or {}))
    check_rebuilt(gm, manifest, root, None)
    try:
        restore_shapes(gm, example_inputs(manifest))
    except Exception as e:  # noqa: BLE001 - an op without a fake kernel here: capture can still rebuild it
        return None, f"propagating shapes through the saved graph failed ({type(e).__name__}: {str(e)[:200]})"
    return gm, ""


def _record(cls: type, d: dict[str, Any]) -> Any:
    """A report dataclass from its saved dict (fields added by later versions are dropped)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "seconds" in names:
        kw.setdefault("seconds", 0.0)  # wall times are not saved
    if kw.get("sqnr_db") is not None:
        kw["sqnr_db"] = float(kw["sqnr_db"])
    return cls(**kw)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved with the artifact at ``path``, or None if none was saved."""
    root = Path(path).expanduser()
    name = read_manifest(root).get("tokenizer")
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root / name))
