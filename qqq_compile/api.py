"""``compile()``: capture, run a preset pipeline, return a :class:`CompiledModel`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .capture import capture
from .compiled import CompiledModel, Report
from .config import CompileConfig
from .pipeline import CompileContext, DumpGraphs, Instrument, Pipeline, QQQPass, readable_graph
from .presets import get_preset


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
        rows.extend(t.reshape(-1, t.shape[-1]).split(1))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError("calibration data is empty: give at least one window of token ids")
    # Batch windows of equal length together; lengths may differ between batches.
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        by_len.setdefault(r.shape[-1], []).append(r)
    batches = []
    for same in by_len.values():
        for i in range(0, len(same), batch_size):
            batches.append({"input_ids": torch.cat(same[i : i + batch_size]).long()})
    return batches


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module,
    calib: Any = None,
    config: CompileConfig | dict | None = None,
    *,
    passes: Sequence[QQQPass] | None = None,
    tokenizer: Any = None,
    example_inputs: Any = None,
    instruments: Sequence[Instrument] = (),
    dump_dir: str | None = None,
    progress: bool = True,
) -> CompiledModel:
    """Quantize ``model`` to W4A8 and return a callable that behaves like it.

    ``config`` picks the preset and format (default: QQQ per-channel); ``passes``
    overrides the preset with an explicit pass list. The user's model is not modified.
    """
    if isinstance(config, dict):
        config = CompileConfig.from_dict(config)
    config = config or CompileConfig()
    batches = calib_batches(calib, tokenizer, config.calib.batch_size, config.calib.max_samples)
    if example_inputs is None and batches:
        # Two rows (export specialises a batch of 1) and contiguous (a strided slice
        # would make export guard on the original row length).
        first = batches[0]["input_ids"][:, :16]
        example_inputs = {"input_ids": first[[0, -1]].contiguous()}
    captured = capture(model, example_inputs)
    gm = captured.graph_module
    source_graph = readable_graph(gm)
    pass_list = list(passes) if passes is not None else get_preset(config.preset, **config.preset_options)
    ctx = CompileContext(calib=batches, quant=config.quant, calib_config=config.calib, progress=progress)
    inst = list(instruments) + ([DumpGraphs(dump_dir)] if dump_dir else [])
    pipeline = Pipeline(pass_list, inst)
    result = pipeline.run(gm, ctx)
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
