"""``compile()``: capture, run the pipeline the config asks for, return a :class:`CompiledModel`;
``compile_from_disk()``: the same with the weights kept on disk.

The pass list is built and run by :mod:`qqq_compile.driver`; this module only chooses the
path (whole model, blockwise fallback, streaming) and wraps the result.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .analysis_notes import float_weights_note  # noqa: F401 - its old home; re-exported
from .blockwise import compile_blockwise
from .capture import Captured, CaptureError, capture
from .capture_blocks import quiet_export
from .compiled import CompiledModel
from .config import CompileConfig
from .driver import PassSpec, as_config, build_passes, run_pipeline
from .errors import StreamingError
from .pipeline import CompileContext, Instrument, readable_graph
from .streaming import StreamWeights, build_skeleton, index_folder, weight_sources


def calib_batches(
    calib: Any, tokenizer: Any = None, batch_size: int = 8, max_samples: int | None = None, seq_len: int = 512
) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration input to a list of ``{"input_ids": [B, T]}`` batches.

    ``calib`` may be a text source name or path (needs ``tokenizer``), a tensor
    ``[N, T]``, or an iterable of token-id tensors ``[T]``/``[1, T]``/``[B, T]`` or of
    dicts with ``input_ids``.
    """
    if calib is None:
        return []
    if isinstance(calib, str):
        if tokenizer is None:
            raise ValueError(f"calib={calib!r} is a text source: pass tokenizer=... so it can be tokenized")
        from .data import load_text, token_windows

        calib = token_windows(tokenizer, load_text(calib), seq_len, region=(0.0, 0.8), n=max_samples or 128)
    if isinstance(calib, torch.Tensor):
        calib = list(calib.unsqueeze(0) if calib.dim() == 1 else calib.split(1))
    rows: list[torch.Tensor] = []
    for item in calib if isinstance(calib, Iterable) else [calib]:
        t = item["input_ids"] if isinstance(item, dict) else item
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"calibration items must be token-id tensors or dicts with input_ids, got {type(t).__name__}"
            )
        if t.is_floating_point():
            raise TypeError("calibration tensors must hold integer token ids, got a floating-point tensor")
        if t.dim() == 0 or t.numel() == 0:
            continue  # an empty item adds nothing; all empty is refused below
        if t.shape[-1] < 2:
            raise ValueError(
                f"calibration window of {t.shape[-1]} token: windows need at least 2 tokens (attention needs a "
                "context); use windows of 64+ tokens, e.g. qqq_compile.data.token_windows(tokenizer, text, 512)"
            )
        rows.extend(t.reshape(-1, t.shape[-1]).split(1))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError("calibration data is empty: give at least one window of token ids (e.g. a [N, T] tensor)")
    # Batch windows of equal length together; lengths may differ between batches.
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        by_len.setdefault(r.shape[-1], []).append(r)
    batches = []
    for same in by_len.values():
        for i in range(0, len(same), batch_size):
            batches.append({"input_ids": torch.cat(same[i : i + batch_size]).long()})
    return batches


MIN_CALIB_TOKENS = 256


def check_calib(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Refuse token ids outside the model's vocabulary; warn when calibration is too
    small for stable statistics (fewer than ``MIN_CALIB_TOKENS`` tokens, or fewer tokens
    than the widest linear has inputs: its Hessian is then rank-deficient)."""
    if not batches:
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(emb, "num_embeddings", None)
    lo = min(int(b["input_ids"].min()) for b in batches)
    hi = max(int(b["input_ids"].max()) for b in batches)
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"calibration token id {bad} is out of range: the model's vocabulary has {vocab} entries (ids 0.."
            f"{(vocab or 0) - 1}), the data's ids span {lo}..{hi}. Tokenize the data with the model's own tokenizer"
        )
    tokens = sum(b["input_ids"].numel() for b in batches)
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    need = max(MIN_CALIB_TOKENS, widest)
    if tokens < need:
        why = (
            f"the {widest} inputs of the widest linear: its GPTQ Hessian is rank-deficient below that"
            if widest > MIN_CALIB_TOKENS
            else "the least for usable activation ranges"
        )
        warnings.warn(
            f"calibration data holds only {tokens} tokens, fewer than {need} ({why}); smoothing scales, "
            "activation ranges and GPTQ are poorly estimated. Use more windows (the standard protocol: 128 x 512 "
            "tokens)",
            stacklevel=3,
        )


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module | str | os.PathLike,
    calib: Any = None,
    config: CompileConfig | dict | None = None,
    *,
    passes: Sequence[PassSpec] | None = None,
    tokenizer: Any = None,
    example_inputs: Any = None,
    instruments: Sequence[Instrument] = (),
    dump_dir: str | None = None,
    progress: bool = True,
    streaming: bool = False,
    fallback: str = "blockwise",
) -> CompiledModel:
    """Quantize ``model`` to W4A8 and return a callable that behaves like it.

    ``config`` picks the preset and format (default: QQQ per-channel); ``passes``
    overrides the preset with an explicit pass list (pass objects or their
    ``{"name", "options"}`` dicts); passes the config implies are appended
    (:func:`qqq_compile.driver.build_passes`). The user's model is not modified.
    ``streaming=True`` takes the path of a ``save_pretrained`` folder instead and keeps
    the float weights on disk, one decoder block in memory at a time
    (:func:`compile_from_disk`).
    ``fallback``: when ``torch.export`` cannot capture the whole model, ``"blockwise"``
    quantizes its decoder blocks one at a time (:mod:`qqq_compile.blockwise`), ``"error"``
    raises the :class:`CaptureError`.
    """
    if fallback not in ("blockwise", "error"):
        raise ValueError(f"fallback={fallback!r} is not known; use 'blockwise' or 'error'")
    if streaming:
        return compile_from_disk(
            model,  # type: ignore[arg-type]
            calib,
            config,
            passes=passes,
            tokenizer=tokenizer,
            example_inputs=example_inputs,
            instruments=instruments,
            dump_dir=dump_dir,
            progress=progress,
        )
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"compile() got the path {str(model)!r}: pass streaming=True to quantize it from disk block by "
            "block, or load the model first (qqq_compile.models.load_model)"
        )
    config = as_config(config)
    build_passes(config, passes)  # bad options or a broken order fail before any work
    batches = calib_batches(calib, tokenizer, config.calib.batch_size, config.calib.max_samples)
    check_calib(model, batches)
    if example_inputs is None and batches:
        # Two rows (export specialises a batch of 1) and contiguous (a strided slice
        # would make export guard on the original row length).
        first = batches[0]["input_ids"][:, :16]
        example_inputs = {"input_ids": first[[0, -1]].contiguous()}
    try:
        with quiet_export() if fallback == "blockwise" else contextlib.nullcontext():
            captured = capture(model, example_inputs)
    except CaptureError as e:
        if fallback == "error":
            raise
        return compile_blockwise(  # type: ignore[return-value] - CompiledModel-like
            model,
            batches,
            config,
            passes=passes,
            example_inputs=example_inputs,
            instruments=instruments,
            dump_dir=dump_dir,
            progress=progress,
            reason=e,
        )
    return compile_captured(
        captured, batches, config, passes=passes, instruments=instruments, dump_dir=dump_dir, progress=progress
    )


def compile_captured(
    captured: Captured,
    batches: list[dict[str, torch.Tensor]],
    config: CompileConfig,
    *,
    passes: Sequence[PassSpec] | None = None,
    instruments: Sequence[Instrument] = (),
    dump_dir: str | None = None,
    progress: bool = True,
) -> CompiledModel:
    """Run the driver over a captured whole-model graph and wrap the result."""
    gm = captured.graph_module
    source_graph = readable_graph(gm)
    ctx = CompileContext(calib=batches, quant=config.quant, calib_config=config.calib, progress=progress)
    gm, report = run_pipeline(gm, ctx, build_passes(config, passes), instruments, config=config, dump_dir=dump_dir)
    return CompiledModel(
        gm,
        input_names=captured.input_names,
        output_kind=captured.output_kind,
        report=report,
        model_config=captured.model_config,
        model_class=captured.model_class,
        source_graph=source_graph,
    )


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
) -> CompiledModel:
    """Quantize the Hugging Face checkpoint in ``folder`` with its weights kept on disk
    (see :mod:`qqq_compile.streaming`).

    Same arguments and result as :func:`compile` (``passes``, ``tokenizer``,
    ``example_inputs``, ``dump_dir``, ``progress``), plus:

    * ``dtype``: compute dtype of the float weights; ``"auto"`` follows ``config.json``
      like ``from_pretrained`` (float32 when it names none).
    * ``cache_bytes``: read cache for passes that walk all linears (default: the largest
      decoder block's weights).
    * ``scratch_dir``: where weights changed by passes are spilled (default: the system
      temp dir); deleted afterwards.

    The result's ``stream_stats`` (:class:`~qqq_compile.streaming.StreamStats`) tells what
    was held in memory.
    """
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
    # The blockwise fallback would run the skeleton itself, whose weights are empty.
    compile_kwargs.setdefault("fallback", "error")
    try:
        compiled = compile(skeleton, calib, config, instruments=[stream, *instruments], **compile_kwargs)
    finally:
        stream.store.close()
    compiled.stream_stats = stream.store.stats
    return compiled
