"""Blockwise fallback: quantize a model that ``torch.export`` cannot capture whole.

When the whole forward is not traceable (data-dependent control flow, an untraceable
construct outside the decoder stack), the decoder blocks usually still are. This module:

1. finds the blocks from the ``nn.Module`` tree with the rule every graph pass uses
   (:func:`qqq_compile.graph.blocks.block_stack`: numbered children holding linears, the
   container with the most linear weight; no per-model code);
2. records each block's inputs (args and kwargs: hidden states, rotary tables, masks...)
   with forward pre-hooks on eager forwards of a copy of the model;
3. exports every block alone (dynamic batch/sequence dims, found by comparing two
   recordings of different shapes; static shapes with a note when that fails);
4. runs the usual pass pipeline on each block graph, in order, calibrating block ``i``
   on the outputs of the already-quantized blocks ``0..i-1`` (sequential, as GPTQ does);
5. returns a :class:`BlockwiseCompiledModel`: a copy of the model whose blocks call the
   lowered block graphs. Everything outside the blocks (embeddings, final norm, lm_head)
   stays eager float. The user's model is never modified (the copy shares its weight
   tensors, as the exported graph does on the whole-model path; passes never write
   tensors in place).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from .api import float_weights_note
from .capture import CaptureError, export_graph
from .compiled import Report
from .config import CompileConfig
from .graph import LinearInfo, info, module_block_stack
from .pipeline import CompileContext, DumpGraphs, Instrument, Note, PassRecord, Pipeline, PipelineError, QQQPass
from .presets import get_preset

PASS_NAME = "blockwise"
_TORCH_DIR = os.path.dirname(torch.__file__)


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


# ----------------------------------------------------------------------------- recording inputs


class _Stop(Exception):
    """Raised by a hook to end an eager forward once the last block has run."""


def _first_tensor_index(flat: Sequence[Any]) -> int | None:
    return next((i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)), None)


def _record(
    model: nn.Module, blocks: list[nn.Module], inputs: dict[str, Any], names: list[str], keep_stream: bool = True
) -> list[tuple[list[Any], Any, int]]:
    """Run ``model(**inputs)`` eagerly and return, per block, ``(flat inputs, spec, stream
    index)`` of its call; stops after the last block (lm_head is not run).

    The *stream* is the block's first tensor input (the hidden states). It must be the
    previous block's first tensor output, unchanged, or blocks cannot be calibrated in
    sequence on quantized outputs. With ``keep_stream=False`` the flat inputs of blocks
    after the first hold None there (the float hidden states are not kept).
    """
    recs: list[Any] = [None] * len(blocks)
    calls = [0] * len(blocks)
    prev_out: list[torch.Tensor | None] = [None]
    handles = []

    def pre(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[i] += 1
            if calls[i] > 1:
                raise CaptureError(
                    f"the blockwise fallback needs each block to run once per forward, but {names[i]} runs "
                    "more than once (shared layers); make the model exportable as a whole"
                )
            flat, spec = tree_flatten((args, kwargs))
            s = _first_tensor_index(flat)
            if s is None:
                raise CaptureError(f"{names[i]} receives no tensor input; the blockwise fallback cannot drive it")
            if i > 0:
                stream, prev = flat[s], prev_out[0]
                if prev is None or not (stream is prev or (stream.shape == prev.shape and torch.equal(stream, prev))):
                    raise CaptureError(
                        f"the blockwise fallback needs each block's first tensor input to be the previous block's "
                        f"first output, but {names[i]} receives something else (the model transforms the hidden "
                        "states between blocks); make the model exportable as a whole"
                    )
                if not keep_stream:
                    flat = list(flat)
                    flat[s] = None
            recs[i] = (list(flat), spec, s)

        return hook

    def post(i: int):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            flat, _ = tree_flatten(out)
            j = _first_tensor_index(flat)
            prev_out[0] = None if j is None else flat[j]
            if i == len(blocks) - 1:
                raise _Stop

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i)))
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [names[i] for i, r in enumerate(recs) if r is None]
    if missing:
        raise CaptureError(f"the blockwise fallback found blocks the forward never calls: {missing[:3]}")
    return recs


def _resize(t: Any, rows: int, seq: int) -> Any:
    """``t`` with ``rows`` rows (dim 0) and ``seq`` positions (dim 1), reusing its values."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.dim() >= 2:
        idx = torch.arange(rows) % t.shape[0]
        t = t[idx]
    d = t.dim() - 1 if t.dim() == 1 else 1
    pos = torch.arange(seq) % t.shape[d]
    return t.index_select(d, pos).contiguous()


def _examples(example_inputs: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    """Two model inputs of different shapes, ``[2, 16]`` and ``[3, 17]``: dims of block
    inputs that follow them are the batch and sequence dims."""
    if example_inputs is None:
        if not batches:
            raise CaptureError("the blockwise fallback needs calib=... or example_inputs=... to run the model")
        example_inputs = {"input_ids": batches[0]["input_ids"]}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs}
    return (
        {k: _resize(v, 2, 16) for k, v in example_inputs.items()},
        {k: _resize(v, 3, 17) for k, v in example_inputs.items()},
    )


# ----------------------------------------------------------------------------- export one block


class _Holder(nn.Module):
    """Holds a block at its qualified path, so the exported graph names weights and
    ``nn_module_stack`` entries as in the full model (``model.layers.3.mlp.up_proj``) and
    :func:`graph.partition` sees one block. Takes ``(args, kwargs)`` as two arguments:
    export's ``dynamic_shapes`` cannot address ``*args``/``**kwargs``."""

    def __init__(self, path: str, block: nn.Module):
        super().__init__()
        self.path = path
        *parents, last = path.split(".")
        cur: nn.Module = self
        for p in parents:
            nxt = nn.Module()
            cur.add_module(p, nxt)
            cur = nxt
        cur.add_module(last, block)

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.get_submodule(self.path)(*args, **kwargs)


def _dims(a: Any, b: Any) -> dict[int, Dim] | None:
    """Batch/seq dims of one input tensor, from its shapes at ``[2, 16]`` and ``[3, 17]``."""
    if not isinstance(a, torch.Tensor) or a.dim() != b.dim():
        return None
    out = {}
    for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)):
        if (x, y) == (2, 3):
            out[d] = _BATCH
        elif (x, y) == (16, 17):
            out[d] = _SEQ
    return out or None


_BATCH, _SEQ = Dim("batch", min=1), Dim("seq", min=2)


def _user_frame(e: BaseException) -> str:
    """``file:line in fn: source`` of the innermost traceback frame outside torch."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence what a failing ``torch.export`` prints (the partial graph on stderr, shape
    warnings) while a fallback is ready to handle the failure."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def export_block(
    name: str, block: nn.Module, rec_a: Any, rec_b: Any, static: Callable[[], Any]
) -> tuple[GraphModule, bool]:
    """Export one block with dynamic batch/seq dims; returns ``(graph, dynamic)``.

    ``rec_a``/``rec_b`` are the block's ``(args, kwargs)`` at model inputs ``[2, 16]`` and
    ``[3, 17]``. When the dynamic export fails, exports with static shapes at the
    ``(args, kwargs)`` that ``static()`` returns; if that fails too, raises
    :class:`CaptureError` naming the block and the construct export stopped at."""
    (args, kwargs), (args_b, kwargs_b) = rec_a, rec_b
    dyn = {
        "args": tuple(_tree_dims(x, y) for x, y in zip(args, args_b, strict=True)),
        "kwargs": {k: _tree_dims(v, kwargs_b[k]) for k, v in kwargs.items()},
    }
    holder = _Holder(name, block)
    try:
        with quiet_export():
            return export_graph(holder, (), {"args": args, "kwargs": kwargs}, dyn), True
    except Exception:  # noqa: BLE001 - retried with static shapes below
        pass
    args_s, kwargs_s = static()
    try:
        with quiet_export():
            return export_graph(holder, (), {"args": args_s, "kwargs": kwargs_s}, None), False
    except Exception as e:  # noqa: BLE001 - re-raised naming the block
        first = str(e).strip().split("\n")[0][:300]
        raise CaptureError(
            f"the blockwise fallback could not export block {name} ({type(block).__name__}): "
            f"{type(e).__name__}: {first}{_user_frame(e)}\n  way out: make {type(block).__name__}.forward traceable "
            "(no Python branches on tensor values: use torch.where/torch.cond), or keep this model in float"
        ) from e


def _tree_dims(a: Any, b: Any) -> Any:
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_dims(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return {k: _tree_dims(v, b[k]) for k, v in a.items()}
    return _dims(a, b)


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


class BlockwiseCompiledModel(nn.Module):
    """What ``compile(..., fallback="blockwise")`` returns when the whole model could not
    be exported: behaves like the model (same call, same outputs), with each decoder
    block running its lowered W4A8 graph.

    * ``.model``: the copy of the model with :class:`LoweredBlock` s in place of blocks.
    * ``.blocks``: qualified block name → lowered ``GraphModule``.
    * ``.report``: per-block pass records (``"lower [model.layers.0]"``) and notes.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, GraphModule], report: Report, block_path: str):
        super().__init__()
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

    def save(self, path: str) -> None:
        from .artifact import ArtifactError

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
    passes: Sequence[QQQPass] | None = None,
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
    ex_a, ex_b = _examples(example_inputs, batches)
    rec_a, rec_b = _record(work, blocks, ex_a, names), _record(work, blocks, ex_b, names)
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
            static_rec.extend(_record(work, blocks, batches[0] if batches else ex_a, names))
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
    calib = [_record(work, blocks, b, names, keep_stream=False) for b in batches]
    streams: list[torch.Tensor | None] = [rec[0][0][rec[0][2]] for rec in calib]
    records: list[PassRecord] = []
    graphs: dict[str, GraphModule] = {}
    pass_names: list[str] = []
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
        ctx = CompileContext(quant=config.quant, calib_config=config.calib, progress=progress)
        for _, (args, kwargs) in inputs:
            vals = fx_pytree.tree_flatten_spec(((), {"args": args, "kwargs": kwargs}), gm._in_spec)
            ctx.calib.append({p.target: v for p, v in zip(placeholders, vals, strict=True)})
        if batches and not ctx.calib:
            raise CaptureError(
                f"block {name} was exported with static shapes and no calibration batch has them; "
                "give calibration batches of one shape (equal-length windows, a batch size that divides their count)"
            )
        pass_list = list(passes) if passes is not None else get_preset(config.preset, **config.preset_options)
        pass_names = [p.name for p in pass_list]
        inst = list(instruments) + ([DumpGraphs(os.path.join(dump_dir, name))] if dump_dir else [])
        pipeline = Pipeline(pass_list, inst)
        try:
            gm = pipeline.run(gm, ctx).graph_module
        except PipelineError as e:
            raise PipelineError(e.pass_name, e.index, e.before, f"in block {name}: {e.__cause__ or e}") from e
        records.extend(PassRecord(f"{r.name} [{name}]", r.modified, r.seconds, r.sqnr_db) for r in pipeline.records)
        notes.extend(ctx.notes)
        kept = float_weights_note(gm)
        if kept:
            notes.append(Note(PASS_NAME, f"{name}: {kept}", name))
        graphs[name] = gm
        lowered = LoweredBlock(name, gm, ref[0], ref[1], dynamic)
        with torch.no_grad():
            for b, (args, kwargs) in inputs:  # the next block calibrates on these outputs
                out, _ = tree_flatten(lowered(*args, **kwargs))
                streams[b] = out[_first_tensor_index(out)]
        _set_module(work, name, lowered)
    outside = [
        n
        for n, m in work.named_modules()
        if _owns_weights(m) and not any(n == b or n.startswith(b + ".") for b in names)
    ]
    if outside:
        notes.append(Note(PASS_NAME, f"modules kept in float (outside the decoder blocks): {', '.join(outside)}"))
    report = Report(records, notes, config.to_dict(), pass_names)
    return BlockwiseCompiledModel(work, graphs, report, path)


def _unflat(rec: tuple[list[Any], Any, int]) -> tuple[tuple, dict]:
    return tree_unflatten(rec[0], rec[1])
