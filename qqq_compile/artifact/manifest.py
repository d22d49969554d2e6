"""The manifest of an artifact: format constants, validation on read, JSON-safe values."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from qqq_compile.errors import ArtifactError

FORMAT = "qqq_compile.artifact"
# Major bumps break old readers; minor bumps only add fields. 1.1 added ``pass_configs``
# (the exact passes, replayed as they ran), ``graph_file`` (the lowered graph itself,
# so load needs no capture) and ``source_graph_file``; 1.2 added ``decode_step`` (the
# AOTInductor decode step shipped in ``step/``: its size, and the CPU and torch it was
# built for). 1.0 and 1.1 artifacts still load.
FORMAT_VERSION = "1.2"
MANIFEST = "qqq_manifest.json"
WEIGHTS = "model.safetensors"
GRAPH = "graph.json"
SOURCE_GRAPH = "source_graph.txt"
TOKENIZER_DIR = "tokenizer"
STEP_DIR = "step"  # AOT packages of the decode step, one per CPU + torch (code only, no weights)
REQUIRED = ("model_class", "model_config", "layers", "graph_tensors", "tensors", "aliases", "weights_file")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of the artifact folder ``path``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        hint = ""
        stale = sorted(root.parent.glob(f".{root.name}.qqq-old-*")) if root.parent.is_dir() else []
        if stale:
            hint = f"; an interrupted save left the previous artifact at {stale[-1]}"
        raise ArtifactError(f"artifact folder {root} does not exist{hint}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"{mpath} is missing: {root} is not a qqq_compile artifact (write one with CompiledModel.save)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt, save it again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath} describes format {fmt!r}, not {FORMAT!r}: not a qqq_compile artifact")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    supported = FORMAT_VERSION.split(".")[0]
    if not major.isdigit():
        raise ArtifactError(
            f"{mpath} has an unreadable format_version {version!r}; the manifest is corrupt: save the model again"
        )
    if int(major) > int(supported):
        writer = manifest.get("versions", {}).get("qqq-compile", "a newer release")
        raise ArtifactError(
            f"{mpath} uses artifact format {version}, written by qqq_compile {writer}; this qqq_compile "
            f"({versions()['qqq-compile']}) reads format {supported}.x only: upgrade qqq_compile "
            "(pip install -U qqq-compile)"
        )
    if int(major) < int(supported):
        raise ArtifactError(f"{mpath} uses the old artifact format {version}; compile and save the model again")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath} lacks the field(s) {missing}; the artifact is corrupt, save it again")
    return manifest


def versions() -> dict[str, str]:
    out = {}
    for dist in ("qqq-compile", "torch", "transformers", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats as strings, tuples as lists, tensors as numbers/lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.dtype):
        return dtype_name(x)
    return str(x)


def config_digest(model_config: dict[str, Any]) -> str:
    """SHA-256 of the HF model config as the manifest stores it: the graph file records it,
    so a config edited after saving sends ``load()`` down the path that checks it."""
    text = json.dumps(jsonable(model_config), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(jsonable(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n"
