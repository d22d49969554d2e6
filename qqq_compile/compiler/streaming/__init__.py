"""Quantize models larger than memory: weights stay on disk, one block is resident at a time.

``qqq_compile.compile(folder, calib, config, streaming=True)`` (which calls
:func:`qqq_compile.compiler.api.compile_from_disk`) quantizes a Hugging Face safetensors checkpoint
without ever holding its float weights:

1. **Skeleton.** The model class is built from ``config.json`` with parameters on the
   meta device (buffers such as rotary tables are computed as usual), then given CPU
   storage that nothing writes: export only reads shapes, and untouched pages cost no RAM.
2. **Lazy weights.** Before the first pass every attribute the checkpoint holds becomes a
   :class:`LazyWeight`: shape and dtype are known, the data is read (a plain ``read`` at
   the tensor's offset: nothing stays mapped) when an op touches it, through an LRU cache
   of one block.
3. **Resident blocks.** :class:`~qqq_compile.compiler.block_runner.BlockRunner` wraps every segment it
   runs in :func:`resident`: the block's weights are read once, stay in the graph while
   passes work on the block, and go back to disk when the runner moves on. A weight a
   pass replaced (smoothing folds scales) is first spilled to a scratch file, so later
   passes read the new value. ``quantize_rtn`` and ``lower`` read through the cache;
   ``rotate``, which rewrites every weight outside the runner, makes each segment
   (embeddings, a block, the head) resident in turn itself.
4. **Finish.** The packed int4 weights are in the graph; the float tensors it still reads
   (embeddings, norms, a float ``lm_head``) are loaded, and the scratch files deleted.

Peak memory: one decoder block of float weights, the calibration activations, the
transients of quantizing one linear, and what the compiled model keeps. The user's files
are only opened for reading. See ``docs/scaling.md`` for measured figures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from qqq_compile.compiler.streaming.store import (
    LazyWeight,
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
from qqq_compile.errors import StreamingError

__all__ = [
    "LazyWeight",
    "StreamStats",
    "StreamWeights",
    "StreamingError",
    "TensorSource",
    "WeightStore",
    "attr_targets",
    "build_skeleton",
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
