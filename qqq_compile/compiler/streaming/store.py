"""The checkpoint side of streaming: safetensors headers and folders, and the
:class:`StreamWeights` pipeline instrument (see :mod:`qqq_compile.compiler.streaming`). The weight
store, :class:`LazyWeight` and :func:`resident` live in :mod:`qqq_compile.compiler.residency`,
under the runner that uses them."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch.fx import GraphModule

from qqq_compile.compiler.pipeline import Instrument, PassResult, QQQPass
from qqq_compile.compiler.residency import (  # noqa: F401 - re-exported: the streaming API names them
    LazyWeight,
    StreamStats,
    TensorSource,
    WeightStore,
    as_param,
    assign_attr,
    attr_targets,
    lookup_attr,
    read_tensor,
    release_memory,
    resident,
    write_tensor,
)
from qqq_compile.errors import StreamingError
from qqq_compile.graph import partition

# ----------------------------------------------------------------------------- safetensors

_NAMES = "F64=float64 F32=float32 F16=float16 BF16=bfloat16 I64=int64 I32=int32 I16=int16 I8=int8 U8=uint8 BOOL=bool"
_DTYPES = {
    k: getattr(torch, v)
    for k, v in (e.split("=") for e in (_NAMES + " F8_E4M3=float8_e4m3fn F8_E5M2=float8_e5m2").split())
}


def read_header(path: str | os.PathLike) -> dict[str, TensorSource]:
    """The tensors of one ``.safetensors`` file, by name (only the header is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for key, d in header.items():
        if key == "__metadata__":
            continue
        if d["dtype"] not in _DTYPES:
            raise StreamingError(f"{path}: tensor {key} has dtype {d['dtype']}, which cannot be streamed")
        begin, end = d["data_offsets"]
        out[key] = TensorSource(path, 8 + n + begin, end - begin, _DTYPES[d["dtype"]], tuple(d["shape"]))
    return out


def index_folder(folder: str | os.PathLike) -> dict[str, TensorSource]:
    """Every tensor of a Hugging Face checkpoint folder (sharded or not), by key."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise StreamingError(
            f"{folder} holds no .safetensors files: streaming reads weights from safetensors "
            "(save the model with save_pretrained(..., safe_serialization=True))"
        )
    out: dict[str, TensorSource] = {}
    for p in paths:
        out.update(read_header(p))
    return out


# ----------------------------------------------------------------------------- instrument


class StreamWeights(Instrument):
    """Pipeline hooks that keep a graph's float weights on disk.

    * ``before_pipeline``: every attribute named in ``sources`` (graph attribute name →
      where its data lies) becomes a :class:`LazyWeight`; tied attributes stay one object.
    * ``after_pass``: weights a pass replaced outside a resident block are spilled back
      to disk, so memory stays bounded between passes.
    * ``after_pipeline``: the float weights the compiled graph still reads are loaded
      into memory, and the scratch files are deleted.

    Passes that rewrite weights outside the runner do it in :func:`resident` scopes
    (``rotate``, segment by segment), so their new values are spilled as they go.
    """

    def __init__(
        self,
        sources: dict[str, TensorSource],
        dtypes: dict[str, torch.dtype],
        *,
        cache_bytes: int | None = None,
        scratch_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ):
        self.sources, self.dtypes = sources, dtypes
        # Weights are read to ``device`` (the compile's); None: torch's default device.
        self.store = WeightStore(scratch_dir=scratch_dir, device=device)
        self._cache_bytes = cache_bytes
        self._group: dict[str, str | None] = {}

    def before_pipeline(self, gm: GraphModule) -> None:
        part = partition(gm)
        blocks = sorted((b.name for b in part.blocks), key=len, reverse=True)

        def group(target: str) -> str | None:
            return next((b for b in blocks if target.startswith(b + ".")), None)

        self._group = {t: group(t) for t in self.sources}
        st = self.store.stats
        per_block: dict[str, int] = {}
        made: dict[int, LazyWeight] = {}
        for target in self.sources:
            cur = lookup_attr(gm, target)
            if cur is None:
                continue  # export dropped it (unused, or a tie named once)
            if id(cur) not in made:
                lz = self.store.add(self.sources[target], self.dtypes[target], group(target))
                made[id(cur)] = lz
                size = self.store.nbytes(lz._qqq_id)
                st.total_bytes += size
                g = group(target)
                if g is None:
                    st.other_bytes += size
                else:
                    per_block[g] = per_block.get(g, 0) + size
            assign_attr(gm, target, made[id(cur)])
        st.block_bytes = max(per_block.values(), default=0)
        # Passes that read weights outside the runner (quantize_rtn) get a cache of one block.
        self.store.cache_bytes = st.block_bytes if self._cache_bytes is None else self._cache_bytes

    def after_pass(self, index: int, pass_: QQQPass, result: PassResult, seconds: float) -> None:
        self.offload(result.graph_module)

    def offload(self, gm: GraphModule) -> None:
        """Spill every streamed attribute a pass replaced with an in-memory tensor."""
        spilled: dict[int, LazyWeight] = {}
        held = 0
        for target in self.sources:
            cur = lookup_attr(gm, target)
            if isinstance(cur, torch.Tensor) and not isinstance(cur, LazyWeight):
                if id(cur) not in spilled:
                    spilled[id(cur)] = self.store.put(cur.detach(), self._group.get(target))
                    held += cur.numel() * cur.element_size()
                assign_attr(gm, target, spilled[id(cur)])
        self.store.stats.held_bytes = max(self.store.stats.held_bytes, held)
        self.store.clear_cache()
        release_memory()

    def after_pipeline(self, gm: GraphModule) -> None:
        self.finish(gm)

    def finish(self, gm: GraphModule) -> None:
        """Load the float weights the graph still reads (the checkpoint's, and lazy
        handles passes added, such as ``rotate``'s untied lm_head); delete the scratch files."""
        store = self.store
        store.tracking = False  # the peaks describe the compile, not the final model
        store.clear_cache()
        loaded: dict[int, torch.Tensor] = {}
        added = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target not in self.sources]
        for target in [*self.sources, *added]:
            cur = lookup_attr(gm, target)
            if isinstance(cur, LazyWeight):
                if cur._qqq_id not in loaded:
                    loaded[cur._qqq_id] = as_param(store.read(cur._qqq_id, cache=False))
                    store.stats.final_bytes += store.nbytes(cur._qqq_id)
                assign_attr(gm, target, loaded[cur._qqq_id])
        store.close()
