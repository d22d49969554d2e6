"""Capture for the blockwise fallback: record each decoder block's inputs on eager
forwards, and export every block alone with dynamic batch/sequence dims.

Like :mod:`qqq_compile.compiler.capture` (whose ``export_graph`` it uses), this is a place that
knows about ``torch.export``; :mod:`qqq_compile.compiler.blockwise` drives it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from qqq_compile.compiler.capture import export_graph
from qqq_compile.errors import CaptureError

_TORCH_DIR = os.path.dirname(torch.__file__)

# ----------------------------------------------------------------------------- recording inputs


class _Stop(Exception):
    """Raised by a hook to end an eager forward once the last block has run."""


def first_tensor_index(flat: Sequence[Any]) -> int | None:
    return next((i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)), None)


def record_block_inputs(
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
            s = first_tensor_index(flat)
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
            j = first_tensor_index(flat)
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
        idx = torch.arange(rows, device=t.device) % t.shape[0]
        t = t[idx]
    d = t.dim() - 1 if t.dim() == 1 else 1
    pos = torch.arange(seq, device=t.device) % t.shape[d]
    return t.index_select(d, pos).contiguous()


def example_pair(example_inputs: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[dict, dict]:
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
