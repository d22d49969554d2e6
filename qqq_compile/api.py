"""``compile()``: capture, run a preset pipeline, return a :class:`CompiledModel`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from .calib import MIN_CALIB_TOKENS, calib_batches, check_calib, example_call  # noqa: F401 - re-exported
from .capture import CaptureError, bind_names, capture, split_call
from .compiled import CompiledModel, Report
from .config import CompileConfig
from .pipeline import CompileContext, DumpGraphs, Instrument, Pipeline, QQQPass, readable_graph
from .presets import get_preset


def float_weights_note(gm: torch.fx.GraphModule) -> str | None:
    """Name every weight (float tensor, 2-D or more) the graph reads outside a linear
    site: embeddings, convolutions, ops no pass matches (einsum → bmm...). They stay in
    float and keep working; the report says so. (Linears kept in float are listed by
    ``CompiledModel.linears()`` with their reason instead.)"""
    from .graph import TRANSPARENT, get_attr, info

    aten = torch.ops.aten
    views = TRANSPARENT | {aten.t.default, aten.permute.default, aten.transpose.int, aten.unsqueeze.default}
    views |= {aten.expand.default, aten.squeeze.dim, aten.squeeze.default}

    def ends(n: torch.fx.Node) -> list[torch.fx.Node]:
        return [e for u in n.users for e in (ends(u) if u.target in views and info(u) is None else [u])]

    found = []
    for n in gm.graph.nodes:
        t = get_attr(gm, n.target) if n.op == "get_attr" else None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            continue
        users = ends(n)
        if users and all(info(u) is None for u in users):
            ops = sorted({str(getattr(u.target, "overloadpacket", u.target)).removeprefix("aten.") for u in users})
            found.append(f"{n.target} {list(t.shape)} ({', '.join(ops)})")
    return "weights kept in float (no W4A8 rewrite for their ops): " + "; ".join(found) if found else None


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module | str | os.PathLike,
    calib: Any = None,
    config: CompileConfig | dict | None = None,
    *,
    passes: Sequence[QQQPass] | None = None,
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

    ``config`` picks the preset and format (default: QQQ per-channel); ``passes``
    overrides the preset with an explicit pass list. The user's model is not modified.
    ``streaming=True`` takes the path of a ``save_pretrained`` folder instead and keeps
    the float weights on disk, one decoder block in memory at a time
    (:func:`qqq_compile.streaming.compile_from_disk`).
    ``fallback``: when ``torch.export`` cannot capture the whole model, ``"blockwise"``
    quantizes its decoder blocks one at a time (:mod:`qqq_compile.blockwise`; token-id
    models only), ``"error"`` raises the :class:`CaptureError`.

    Any module ``torch.export`` can capture works: ``calib`` holds token ids for language
    models and forward calls (tensors, tuples, dicts) for other modules
    (:mod:`qqq_compile.calib`); ``example_inputs`` is a call as torch.export takes one
    (``(x,)``, ``{"input_ids": ...}``, ``((x,), {"mask": m})``; default: from the first
    calibration batch) and ``dynamic_shapes`` is torch.export's own format (default:
    :func:`qqq_compile.capture.capture`'s rule). The compiled model takes the same call.
    """
    if fallback not in ("blockwise", "error"):
        raise ValueError(f"fallback={fallback!r} is not known; use 'blockwise' or 'error'")
    if streaming:
        from .streaming import compile_from_disk

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
    if isinstance(config, dict):
        config = CompileConfig.from_dict(config)
    config = config or CompileConfig()
    batches = calib_batches(calib, tokenizer, config.calib.batch_size, config.calib.max_samples, model=model)
    check_calib(model, batches)
    tokens = not batches or set(batches[0]) == {"input_ids"}
    if example_inputs is None and batches:
        example_inputs = example_call(batches)
    from .blockwise import quiet_export

    try:
        with quiet_export() if fallback == "blockwise" and tokens else contextlib.nullcontext():
            captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except CaptureError as e:
        if fallback == "error" or not tokens:
            raise  # the blockwise fallback drives token-id models only
        from .blockwise import compile_blockwise

        if example_inputs is not None:  # the fallback takes keyword inputs: {"input_ids": ...}
            example_inputs = bind_names(model, *split_call(example_inputs))
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
    gm = captured.graph_module
    source_graph = readable_graph(gm)
    pass_list = list(passes) if passes is not None else get_preset(config.preset, **config.preset_options)
    if config.quant.float_weight_dtype and not any(p.name == "cast_float" for p in pass_list):
        from .passes.cast_float import CastFloatWeights

        pass_list.append(CastFloatWeights())  # the config asks for it; runs after lowering
    graph_batches = [captured.graph_inputs(b) for b in batches]
    ctx = CompileContext(calib=graph_batches, quant=config.quant, calib_config=config.calib, progress=progress)
    if not captured.dynamic.startswith("dynamic") or not tokens:
        ctx.note("capture", f"captured with {captured.dynamic}")
    inst = list(instruments) + ([DumpGraphs(dump_dir)] if dump_dir else [])
    pipeline = Pipeline(pass_list, inst)
    result = pipeline.run(gm, ctx)
    kept = float_weights_note(result.graph_module)
    if kept:
        ctx.note("compile", kept)
    report = Report(pipeline.records, ctx.notes, config.to_dict(), [p.name for p in pass_list])
    return CompiledModel(
        result.graph_module,
        input_names=captured.input_names,
        output_kind=captured.output_kind,
        report=report,
        model_config=captured.model_config,
        model_class=captured.model_class,
        source_graph=source_graph,
    )
