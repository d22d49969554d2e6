"""``compile()``: capture, run the pipeline the config asks for, return a :class:`CompiledModel`;
``compile_from_disk()``: the same with the weights kept on disk.

The pass list is built and run by :mod:`qqq_compile.compiler.driver`; this module only chooses the
path (whole model, blockwise fallback, streaming) and wraps the result.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qqq_compile.compiler.blockwise import compile_blockwise
from qqq_compile.compiler.calibration import MIN_CALIB_TOKENS, calib_batches, check_calib, example_call  # noqa: F401 - re-exported
from qqq_compile.compiler.capture import Captured, CaptureError, bind_names, capture, split_call
from qqq_compile.compiler.capture_blocks import quiet_export
from qqq_compile.compiler.driver import PassSpec, as_config, build_context, build_passes, run_pipeline
from qqq_compile.compiler.pipeline import Instrument, readable_graph
from qqq_compile.compiler.streaming import StreamWeights, build_skeleton, index_folder, weight_sources
from qqq_compile.config import CompileConfig
from qqq_compile.errors import StreamingError
from qqq_compile.runtime.compiled import CompiledModel


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module | str | os.PathLike,
    calib: Any = None,
    config: CompileConfig | dict | None = None,
    *,
    passes: Sequence[PassSpec] | None = None,
    tokenizer: Any = None,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    instruments: Sequence[Instrument] = (),
    dump_dir: str | None = None,
    progress: bool = True,
    streaming: bool = False,
    fallback: str = "blockwise",
) -> CompiledModel:
    """Quantize ``model`` to W4A8 and return a callable that behaves like it.

    ``config`` picks the preset and format (default: ``qqq_rot`` in the target's default format); ``passes``
    overrides the preset with an explicit pass list (pass objects or their
    ``{"name", "options"}`` dicts); passes the config implies are appended
    (:func:`qqq_compile.compiler.driver.build_passes`). The user's model is not modified.
    ``streaming=True`` takes the path of a ``save_pretrained`` folder instead and keeps
    the float weights on disk, one decoder block in memory at a time
    (:func:`compile_from_disk`).
    ``fallback``: when ``torch.export`` cannot capture the whole model, ``"blockwise"``
    quantizes its decoder blocks one at a time (:mod:`qqq_compile.compiler.blockwise`; token-id
    models only), ``"error"`` raises the :class:`CaptureError`.

    Any module ``torch.export`` can capture works: ``calib`` holds token ids for language
    models and forward calls (tensors, tuples, dicts) for other modules
    (:mod:`qqq_compile.compiler.calibration`); ``example_inputs`` is a call as torch.export takes one
    (``(x,)``, ``{"input_ids": ...}``, ``((x,), {"mask": m})``; default: from the first
    calibration batch) and ``dynamic_shapes`` is torch.export's own format (default:
    :func:`qqq_compile.compiler.capture.capture`'s rule). The compiled model takes the same call.
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
    changes: list[str] = []
    pass_list = build_passes(config, passes, changes)  # bad options or a broken order fail before any work
    batches = calib_batches(calib, tokenizer, config.calib.batch_size, config.calib.max_samples, model=model)
    check_calib(model, batches)
    tokens = not batches or set(batches[0]) == {"input_ids"}
    if example_inputs is None and batches:
        example_inputs = example_call(batches)
    try:
        with quiet_export() if fallback == "blockwise" and tokens else contextlib.nullcontext():
            captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except CaptureError as e:
        if fallback == "error" or not tokens:
            raise  # the blockwise fallback drives token-id models only
        if example_inputs is not None:  # the fallback takes keyword inputs: {"input_ids": ...}
            example_inputs = bind_names(model, *split_call(example_inputs))
        return compile_blockwise(
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
    return _run_captured(captured, batches, config, pass_list, changes, instruments, dump_dir, progress)


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
    changes: list[str] = []
    pass_list = build_passes(config, passes, changes)
    return _run_captured(captured, batches, config, pass_list, changes, instruments, dump_dir, progress)


def _run_captured(
    captured: Captured,
    batches: list[dict[str, torch.Tensor]],
    config: CompileConfig,
    pass_list: list[Any],
    changes: list[str],
    instruments: Sequence[Instrument],
    dump_dir: str | None,
    progress: bool,
) -> CompiledModel:
    gm = captured.graph_module
    source_graph = readable_graph(gm)
    graph_batches = [captured.graph_inputs(b) for b in batches]
    ctx = build_context(config, graph_batches, progress=progress, device=captured.device)
    if not captured.dynamic.startswith("dynamic") or set(captured.input_names) != {"input_ids"}:
        ctx.note("capture", f"captured with {captured.dynamic}")
    if captured.replicated:
        ctx.note("capture", captured.replicated)
    for msg in changes:
        ctx.note("target", msg)
    gm, report = run_pipeline(gm, ctx, pass_list, instruments, config=config, dump_dir=dump_dir)
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
    device: torch.device | str | None = None,
    instruments: Sequence[Instrument] = (),
    **compile_kwargs: Any,
) -> CompiledModel:
    """Quantize the Hugging Face checkpoint in ``folder`` with its weights kept on disk
    (see :mod:`qqq_compile.compiler.streaming`).

    Same arguments and result as :func:`compile` (``passes``, ``tokenizer``,
    ``example_inputs``, ``dump_dir``, ``progress``), plus:

    * ``dtype``: compute dtype of the float weights; ``"auto"`` follows ``config.json``
      like ``from_pretrained`` (float32 when it names none).
    * ``cache_bytes``: read cache for passes that walk all linears (default: the largest
      decoder block's weights).
    * ``scratch_dir``: where weights changed by passes are spilled (default: the system
      temp dir); deleted afterwards.
    * ``device``: where each block's weights are read to and quantized (default: torch's
      default device).

    The result's ``stream_stats`` (:class:`~qqq_compile.compiler.streaming.StreamStats`) tells what
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
    files = index_folder(folder)
    skeleton = build_skeleton(folder, dtype)
    sources = weight_sources(skeleton, files)
    dtypes = {k: t.dtype for k, t in skeleton.state_dict(keep_vars=True).items()}
    stream = StreamWeights(sources, dtypes, cache_bytes=cache_bytes, scratch_dir=scratch_dir, device=device)
    # The blockwise fallback would run the skeleton itself, whose weights are empty.
    compile_kwargs.setdefault("fallback", "error")
    try:
        compiled = compile(skeleton, calib, config, instruments=[stream, *instruments], **compile_kwargs)
    finally:
        stream.store.close()
    compiled.stream_stats = stream.store.stats
    return compiled
