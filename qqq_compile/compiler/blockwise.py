"""Blockwise fallback: quantize a model that ``torch.export`` cannot capture whole.

When the whole forward is not traceable (data-dependent control flow, an untraceable
construct outside the decoder stack), the decoder blocks usually still are. This module:

1. finds the blocks from the ``nn.Module`` tree with the rule every graph pass uses
   (:func:`qqq_compile.graph.blocks.block_stack`: numbered children holding linears, the
   container with the most linear weight; no per-model code);
2. records each block's inputs (args and kwargs: hidden states, rotary tables, masks...)
   with forward pre-hooks on eager forwards of a copy of the model
   (:mod:`qqq_compile.compiler.capture_blocks`);
3. exports every block alone (dynamic batch/sequence dims, found by comparing two
   recordings of different shapes; static shapes with a note when that fails);
4. runs the pipeline the driver builds (:func:`qqq_compile.compiler.driver.build_passes`, the
   same as the whole-model path, ``cast_float`` included) on each block graph, in order,
   calibrating block ``i`` on the outputs of the already-quantized blocks ``0..i-1``
   (sequential, as GPTQ does);
5. returns a :class:`BlockwiseCompiledModel`: a copy of the model whose blocks call the
   lowered block graphs. Everything outside the blocks (embeddings, final norm, lm_head)
   stays eager float (so ``QuantConfig.int8_head`` does not apply on this path). The
   user's model is never modified (the copy shares its weight tensors, as the exported
   graph does on the whole-model path; passes never write tensors in place).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from qqq_compile.compiler.capture import CaptureError
from qqq_compile.compiler.capture_blocks import (
    example_pair,
    export_block,
    first_tensor_index,
    record_block_inputs,
)
from qqq_compile.compiler.driver import PassSpec, build_context, build_passes, run_pipeline
from qqq_compile.compiler.pipeline import Instrument
from qqq_compile.compiler.report import Note, PassRecord, Report
from qqq_compile.config import CompileConfig
from qqq_compile.errors import ArtifactError
from qqq_compile.graph import LinearInfo, info, module_block_stack
from qqq_compile.runtime.compiled import CompiledModel
from qqq_compile.runtime.generate import GenerationError, context_limit
from qqq_compile.runtime.kv_cache import CacheSpec

PASS_NAME = "blockwise"


# ----------------------------------------------------------------------------- finding blocks


def find_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """``(container path, [qualified block names])`` of the decoder stack, by the same rule
    the graph passes use (:func:`qqq_compile.graph.blocks.block_stack`, applied to the
    module tree's linear layers). Raises :class:`CaptureError` when there is none."""
    stack = module_block_stack(model)
    if stack is None:
        raise CaptureError(
            "the blockwise fallback found no decoder blocks: no container whose numbered children (0..n-1) "
            "hold linear layers. Make the model exportable as a whole (see the export error above)"
        )
    return stack.path, list(stack.names)


# ----------------------------------------------------------------------------- the result


class LoweredBlock(nn.Module):
    """Stands in for one block: checks the call matches the one recorded at export, then
    runs the lowered graph. Non-tensor inputs (``use_cache=False``, ``None`` masks) were
    specialised at export (shapes too, for a static export): other ones are refused."""

    def __init__(self, name: str, graph_module: GraphModule, flat: list[Any], spec: Any, dynamic: bool):
        super().__init__()
        self.name, self.graph_module, self.spec, self.dynamic = name, graph_module, spec, dynamic
        paths = [k for k, _ in tree_flatten_with_path(tree_unflatten(flat, spec))[0]]
        # (args, kwargs) paths as the block's argument names: "args[0]", "attention_mask"
        self.keys = [f"args{keystr(k[1:])}" if k[0].idx == 0 else f"{k[1].key}{keystr(k[2:])}" for k in paths]
        self.constants = {i: v for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)}
        self.shapes = {i: tuple(v.shape) for i, v in enumerate(flat) if isinstance(v, torch.Tensor)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        why = None
        if spec != self.spec:
            why = f"other arguments ({' '.join(str(spec).split())[:160]})"
        else:
            for i, v in self.constants.items():
                if isinstance(flat[i], torch.Tensor) or flat[i] != v:
                    why = f"{self.keys[i]} = {_short(flat[i])} where it was {v!r}"
            for i, shape in self.shapes.items():
                if not self.dynamic and tuple(flat[i].shape) != shape:
                    why = f"{self.keys[i]} of shape {list(flat[i].shape)} (exported for {list(shape)} only)"
        if why is not None:
            raise TypeError(
                f"block {self.name} was compiled for the call it saw during calibration, but gets {why}; call the "
                "compiled model as during calibration (no KV cache, no padding mask"
                + ("" if self.dynamic else ", the calibration batch shape")
                + ")"
            )
        return self.graph_module(args=args, kwargs=kwargs)


def _short(v: Any) -> str:
    return f"a tensor {list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:80]


class FullForwardStep:
    """A decode step without a KV cache, for :class:`BlockwiseCompiledModel`: its blocks were
    exported without one, so every call runs the whole sequence so far (cost quadratic in
    the length). Same call as a cached step: ``(input_ids, attention_mask, cache_position)``."""

    runtime = "full-forward"

    def __init__(self, model: nn.Module, max_batch: int, max_len: int):
        self.model = model
        self.spec = CacheSpec(max_batch=max_batch, max_len=max_len)
        self.notes = ["blockwise model: no KV cache, each step runs the whole sequence"]
        self._ids: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor) -> Any:
        if not bool(attention_mask.all()):
            raise GenerationError(
                "a model compiled block by block generates without a KV cache and cannot take padded batches "
                "(its blocks were exported without a padding mask): generate one prompt (or equal-length prompts) "
                "per call"
            )
        start = int(cache_position[0])
        self._ids = input_ids if start == 0 or self._ids is None else torch.cat([self._ids[:, :start], input_ids], 1)
        with torch.no_grad():
            out = self.model(input_ids=self._ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]


class BlockwiseCompiledModel(CompiledModel):
    """What ``compile(..., fallback="blockwise")`` returns when the whole model could not
    be exported: behaves like the model (same call, same outputs), with each decoder
    block running its lowered W4A8 graph. It is a :class:`CompiledModel`: ``generate()``
    works (with :class:`FullForwardStep`: no KV cache, one prompt or equal-length prompts
    per call); ``save()`` and ``prepare_generation()`` raise an error naming what is missing.

    * ``.model``: the copy of the model with :class:`LoweredBlock` s in place of blocks.
    * ``.blocks``: qualified block name → lowered ``GraphModule``.
    * ``.report``: per-block pass records (``"lower [model.layers.0]"``) and notes.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, GraphModule], report: Report, block_path: str):
        nn.Module.__init__(self)  # no whole-model graph: the CompiledModel fields that need one stay empty
        self.graph_module = None
        self.input_names, self.output_kind, self.source_graph = ["input_ids"], "hf", None
        self._prepared, self._auto_step, self.aot_dir = [], None, None
        self.model = model
        self.blocks = blocks
        self.block_path = block_path
        self.report = report
        hf = hasattr(model, "config") and hasattr(model.config, "to_dict")
        self.model_config = model.config.to_dict() if hf else None
        self.model_class = type(model).__name__

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.model_config is not None:
            kwargs["use_cache"] = False  # blocks were compiled without a KV cache
        return self.model(*args, **kwargs)

    def linears(self) -> list[LinearInfo]:
        """Per-linear facts: the blocks' linears (graph order), then the linear layers
        outside the blocks, kept in float, with the reason."""
        out = [li for gm in self.blocks.values() for n in gm.graph.nodes if isinstance(li := info(n), LinearInfo)]
        for name, m in self.model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.Embedding, LoweredBlock)) or not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            if not any(name.startswith(b + ".") for b in self.blocks):
                n_out, k = w.shape if isinstance(m, nn.Linear) else w.shape[::-1]  # Conv1D stores [K, N]
                li = LinearInfo(name, k, n_out, skipped="outside the decoder blocks: kept in float (blockwise)")
                out.append(li)
        return out

    def prepare_generation(self, *args: Any, **kwargs: Any) -> Any:
        raise GenerationError(
            "prepare_generation builds a KV-cache step from the whole model's graph, which a model compiled block by "
            "block does not have; call generate() directly (it runs without a KV cache)"
        )

    def _pick_step(self, rows: int, need: int, runtime: str | None) -> FullForwardStep:
        limit = context_limit(self.model_config)
        return FullForwardStep(self.model, rows, limit or need)

    def save(self, path: str, tokenizer: Any = None) -> None:
        raise ArtifactError(
            "models compiled block by block (the whole model could not be exported) cannot be saved as artifacts "
            "yet: load() rebuilds the model by exporting it whole. Keep the compiled object, or make the model "
            "exportable as a whole"
        )

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer the compiled model holds (shared ones once)."""
        tensors = {t.data_ptr(): t for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def __repr__(self) -> str:
        lin = self.linears()
        low = sum(1 for li in lin if li.lowered)
        return (
            f"BlockwiseCompiledModel({self.model_class}, {len(self.blocks)} blocks, "
            f"{low}/{len(lin)} linears lowered to W4A8)"
        )


# ----------------------------------------------------------------------------- driver


def _share_tensors_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the model's own
    tensors (no second copy of the weights)."""
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _owns_weights(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    *parent, last = name.split(".")
    setattr(root.get_submodule(".".join(parent)) if parent else root, last, new)


def compile_blockwise(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    config: CompileConfig,
    *,
    passes: Sequence[PassSpec] | None = None,
    example_inputs: Any = None,
    instruments: Sequence[Instrument] = (),
    dump_dir: str | None = None,
    progress: bool = True,
    reason: BaseException | None = None,
) -> BlockwiseCompiledModel:
    """Quantize ``model`` one decoder block at a time (see the module docstring).

    ``reason`` is the whole-model capture error that led here (recorded as a note)."""
    from tqdm.auto import tqdm

    try:
        path, names = find_blocks(model)
    except CaptureError as e:
        if reason is None:
            raise
        raise CaptureError(f"{reason}\n  {e}") from reason
    work = _share_tensors_copy(model).eval()
    for m in work.modules():  # blocks are exported without a KV cache (the top model's or nested ones)
        if hasattr(getattr(m, "config", None), "use_cache"):
            m.config.use_cache = False
    blocks = [work.get_submodule(n) for n in names]
    ex_a, ex_b = example_pair(example_inputs, batches)
    rec_a, rec_b = record_block_inputs(work, blocks, ex_a, names), record_block_inputs(work, blocks, ex_b, names)
    notes: list[Note] = []
    if reason is not None:
        notes.append(
            Note(
                PASS_NAME,
                f"the whole model could not be exported ({str(reason).splitlines()[0][:300]}); quantized the "
                f"{len(names)} blocks of {path or 'the model'} one at a time; everything else stays in float",
                level="warning",
            )
        )
    # Export every block before calibrating any: an untraceable block fails fast.
    static_rec: list[tuple[list[Any], Any, int]] = []

    def static_inputs(i: int) -> tuple[tuple, dict]:
        if not static_rec:  # only when a dynamic export failed: one more eager forward
            static_rec.extend(record_block_inputs(work, blocks, batches[0] if batches else ex_a, names))
        return _unflat(static_rec[i])

    exported: list[tuple[GraphModule, bool]] = []
    for i, name in enumerate(names):
        gm, dynamic = export_block(name, blocks[i], _unflat(rec_a[i]), _unflat(rec_b[i]), lambda i=i: static_inputs(i))
        if not dynamic:
            notes.append(
                Note(
                    PASS_NAME,
                    f"{name}: export with dynamic batch/sequence dims failed; exported with static shapes, so the "
                    "compiled model accepts only inputs of the first calibration batch's shape",
                    name,
                    "warning",
                )
            )
        exported.append((gm, dynamic))
    del rec_b
    # Inputs of every block for every calibration batch, from one float forward per batch
    # (hidden states dropped after block 0: they come from the quantized blocks below).
    calib = [record_block_inputs(work, blocks, b, names, keep_stream=False) for b in batches]
    streams: list[torch.Tensor | None] = [rec[0][0][rec[0][2]] for rec in calib]
    records: list[PassRecord] = []
    graphs: dict[str, GraphModule] = {}
    pass_configs: list[dict[str, Any]] = []
    whole_model: list[str] = []  # passes for the whole model's graph, not run on the blocks
    device = next((t.device for t in work.parameters()), torch.device("cpu"))
    for i, name in enumerate(tqdm(names, desc="blockwise", disable=not progress, leave=False)):
        gm, dynamic = exported[i]
        ref = rec_a[i] if dynamic else static_rec[i]
        inputs = []  # (batch index, (args, kwargs)) of the calibration batches this block runs
        for b, rec in enumerate(calib):
            flat, spec, s = rec[i]
            rec[i] = None  # type: ignore[call-overload] - free this block's record
            if streams[b] is None:
                continue
            flat[s] = streams[b]
            if not dynamic and any(
                isinstance(v, torch.Tensor) and v.shape != w.shape for v, w in zip(flat, ref[0], strict=True)
            ):
                streams[b] = None  # a static graph runs only at the shapes it was exported with
                continue
            inputs.append((b, tree_unflatten(flat, spec)))
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ctx = build_context(config, progress=progress, device=device)
        for _, (args, kwargs) in inputs:
            vals = fx_pytree.tree_flatten_spec(((), {"args": args, "kwargs": kwargs}), gm._in_spec)
            ctx.calib.append({p.target: v for p, v in zip(placeholders, vals, strict=True)})
        if batches and not ctx.calib:
            raise CaptureError(
                f"block {name} was exported with static shapes and no calibration batch has them; "
                "give calibration batches of one shape (equal-length windows, a batch size that divides their count)"
            )
        # fresh pass objects per block (presets). Passes that work on the whole model (the
        # int8 head) are not run on the blocks: the lm_head and the embedding live outside
        # them (eager float, see the module docstring), and on a block graph such a pass would
        # take the block's last float linear for the head.
        changes: list[str] = []
        built = build_passes(config, passes, changes)
        for msg in changes:
            ctx.note("target", msg)
        whole_model += [p.name for p in built if p.whole_model and p.name not in whole_model]
        pass_list = [p for p in built if not p.whole_model]
        block_dump = os.path.join(dump_dir, name) if dump_dir else None
        gm, block_report = run_pipeline(
            gm, ctx, pass_list, instruments, config=config, dump_dir=block_dump, scope=f"block {name}"
        )
        pass_configs = block_report.pass_configs
        records.extend(PassRecord(f"{r.name} [{name}]", r.modified, r.seconds, r.sqnr_db) for r in block_report.passes)
        notes.extend(block_report.notes)
        graphs[name] = gm
        lowered = LoweredBlock(name, gm, ref[0], ref[1], dynamic)
        with torch.no_grad():
            for b, (args, kwargs) in inputs:  # the next block calibrates on these outputs
                out, _ = tree_flatten(lowered(*args, **kwargs))
                streams[b] = out[first_tensor_index(out)]
        _set_module(work, name, lowered)
    outside = [
        n
        for n, m in work.named_modules()
        if _owns_weights(m) and not any(n == b or n.startswith(b + ".") for b in names)
    ]
    if outside:
        notes.append(Note(PASS_NAME, f"modules kept in float (outside the decoder blocks): {', '.join(outside)}"))
    if whole_model:
        notes.append(
            Note(PASS_NAME, f"{', '.join(whole_model)} not applied: the lm_head and embedding stay eager float here")
        )
    report = Report(records, notes, config.to_dict(), [p["name"] for p in pass_configs], pass_configs)
    return BlockwiseCompiledModel(work, graphs, report, path)


def _unflat(rec: tuple[list[Any], Any, int]) -> tuple[tuple, dict]:
    return tree_unflatten(rec[0], rec[1])
