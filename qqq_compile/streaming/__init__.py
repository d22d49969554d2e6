"""Quantize models larger than memory: weights stay on disk, one block is resident at a time.

``compile_from_disk(folder, calib, config)`` (or ``compile(folder, ..., streaming=True)``)
quantizes a Hugging Face safetensors checkpoint without ever holding its float weights:

1. **Skeleton.** The model class is built from ``config.json`` with parameters on the
   meta device (buffers such as rotary tables are computed as usual), then given CPU
   storage that nothing writes: export only reads shapes, and untouched pages cost no RAM.
2. **Lazy weights.** Before the first pass every attribute the checkpoint holds becomes a
   :class:`LazyWeight`: shape and dtype are known, the data is read (a plain ``read`` at
   the tensor's offset: nothing stays mapped) when an op touches it, through an LRU cache
   of one block.
3. **Resident blocks.** :class:`~qqq_compile.runner.BlockRunner` wraps every segment it
   runs in :func:`resident`: the block's weights are read once, stay in the graph while
   passes work on the block, and go back to disk when the runner moves on. A weight a
   pass replaced (smoothing folds scales) is first spilled to a scratch file, so later
   passes read the new value. ``quantize_rtn`` and ``lower`` read through the cache.
4. **Finish.** The packed int4 weights are in the graph; the float tensors it still reads
   (embeddings, norms, a float ``lm_head``) are loaded, and the scratch files deleted.

Peak memory: one decoder block of float weights, the calibration activations, the
transients of quantizing one linear, and what the compiled model keeps. The user's files
are only opened for reading. See ``docs/scaling.md`` for measured figures.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..pipeline import Instrument
from .store import (
    LazyWeight,
    StreamingError,
    StreamStats,
    StreamWeights,
    TensorSource,
    WeightStore,
    attr_targets,
    index_folder,
    read_header,
    read_tensor,
    release_memory,
    resident,
)

__all__ = [
    "LazyWeight",
    "StreamStats",
    "StreamWeights",
    "StreamingError",
    "TensorSource",
    "WeightStore",
    "attr_targets",
    "build_skeleton",
    "compile_from_disk",
    "index_folder",
    "read_header",
    "read_tensor",
    "release_memory",
    "resident",
    "weight_sources",
]

# ----------------------------------------------------------------------------- skeleton


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers computed as usual."""
    orig = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        orig(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:  # already-meta parameters are ties: keep them
            self._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig  # type: ignore[method-assign]


def resolve_dtype(config: Any, dtype: torch.dtype | str) -> torch.dtype:
    """``"auto"`` → the checkpoint config's dtype (as ``from_pretrained`` does), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        got = getattr(torch, str(dtype), None)
        if not isinstance(got, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.float32 or 'auto'")
        return got
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    return cfg if isinstance(cfg, torch.dtype) else torch.float32


def build_skeleton(folder: str | os.PathLike, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The checkpoint's model class with uninitialised weights that take no memory.

    Parameters get ``torch.empty`` CPU storage that is never written, so the OS never
    backs it (export only reads shapes); buffers that the model computes at
    construction (rotary frequencies) are real.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(str(folder))
    dt = resolve_dtype(config, dtype)
    with _params_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.tie_weights()  # skipped with the init; ties must hold before storage is given
    empty: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in empty:
                    empty[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                mod._parameters[k] = empty[id(p)]
    return model.eval()


def weight_sources(model: torch.nn.Module, files: dict[str, TensorSource]) -> dict[str, TensorSource]:
    """Checkpoint location of every state-dict entry of ``model`` (tied aliases included).

    Raises :class:`StreamingError` naming the entries the checkpoint lacks.
    """
    aliases: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(name)
    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers
    out, missing = {}, []
    for name, t in state.items():
        key = next((a for a in [name, *aliases.get(id(t), [])] if a in files), None)
        if key is None:
            missing.append(name)
        else:
            out[name] = files[key]
    if missing:
        raise StreamingError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}; "
            "stream a folder written by save_pretrained (safetensors) for this model class"
        )
    return out


# ----------------------------------------------------------------------------- compile


def compile_from_disk(
    folder: str | os.PathLike,
    calib: Any = None,
    config: Any = None,
    *,
    dtype: torch.dtype | str = "auto",
    cache_bytes: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
    instruments: Sequence[Instrument] = (),
    **compile_kwargs: Any,
) -> Any:
    """Quantize the Hugging Face checkpoint in ``folder`` with its weights kept on disk.

    Same arguments and result as :func:`qqq_compile.compile` (``passes``, ``tokenizer``,
    ``example_inputs``, ``dump_dir``, ``progress``), plus:

    * ``dtype``: compute dtype of the float weights; ``"auto"`` follows ``config.json``
      like ``from_pretrained`` (float32 when it names none).
    * ``cache_bytes``: read cache for passes that walk all linears (default: the largest
      decoder block's weights).
    * ``scratch_dir``: where weights changed by passes are spilled (default: the system
      temp dir); deleted afterwards.

    The result's ``stream_stats`` (:class:`StreamStats`) tells what was held in memory.
    """
    from ..api import compile as compile_in_memory

    folder = Path(folder).expanduser() if isinstance(folder, (str, os.PathLike)) else folder
    if not isinstance(folder, Path):
        raise TypeError(
            f"streaming compile reads the model from its folder, got a {type(folder).__name__}; pass the path "
            "of a save_pretrained folder (config.json + *.safetensors)"
        )
    if not (folder / "config.json").is_file():
        raise StreamingError(f"{folder} has no config.json: pass a folder written by save_pretrained")
    opts = config.get("preset_options", {}) if isinstance(config, dict) else getattr(config, "preset_options", {})
    if opts.get("rotation") or any(getattr(p, "name", "") == "rotate" for p in compile_kwargs.get("passes") or ()):
        warnings.warn(
            "the rotate pass rewrites every weight in one go, outside the block runner: while it runs the "
            "whole rotated model is in memory, so streaming does not bound its peak",
            stacklevel=2,
        )
    files = index_folder(folder)
    skeleton = build_skeleton(folder, dtype)
    sources = weight_sources(skeleton, files)
    dtypes = {k: t.dtype for k, t in skeleton.state_dict(keep_vars=True).items()}
    stream = StreamWeights(sources, dtypes, cache_bytes=cache_bytes, scratch_dir=scratch_dir)
    if "fallback" in inspect.signature(compile_in_memory).parameters:
        # The blockwise fallback would run the skeleton itself, whose weights are empty.
        compile_kwargs.setdefault("fallback", "error")
    try:
        compiled = compile_in_memory(skeleton, calib, config, instruments=[stream, *instruments], **compile_kwargs)
    finally:
        stream.store.close()
    compiled.stream_stats = stream.store.stats
    return compiled
