"""Residency of float weights kept on disk: :class:`LazyWeight`, the :class:`WeightStore`
behind it and :func:`resident`, which the block runner wraps around every segment it runs.

This sits under the runner (layer 3) because the runner is what makes a block's weights
resident; :mod:`qqq_compile.compiler.streaming` builds on it (reading checkpoints, the
:class:`~qqq_compile.compiler.streaming.StreamWeights` instrument). For graphs whose weights are
ordinary tensors every function here is free: nothing is lazy, nothing is read.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_map_only

from qqq_compile.errors import StreamingError
from qqq_compile.graph import get_attr

aten = torch.ops.aten

# ----------------------------------------------------------------------------- tensor files


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor's bytes lie in a file (little-endian, row-major)."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_tensor(src: TensorSource) -> torch.Tensor:
    """Read one tensor into fresh host memory (a plain read: nothing stays mapped); the
    store moves it to its device."""
    buf = torch.empty(src.nbytes, dtype=torch.uint8)  # host: file bytes land in host memory (numpy view)
    view = memoryview(buf.numpy())
    with open(src.path, "rb", buffering=0) as f:
        f.seek(src.offset)
        got = 0
        while got < src.nbytes:  # one read() returns at most ~2 GiB
            k = f.readinto(view[got:])
            if not k:
                raise StreamingError(f"{src.path} ends early: the file is truncated")
            got += k
    return buf.view(src.dtype).reshape(src.shape)


def write_tensor(f: Any, t: torch.Tensor) -> tuple[int, int]:
    """Append ``t``'s bytes to the open file ``f``; returns (offset, nbytes)."""
    flat = t.detach().contiguous().reshape(-1)
    flat = flat.cpu()  # host: the bytes go to a file through numpy (a no-op for a CPU tensor)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)  # host: as above
    offset = f.tell()
    f.write(memoryview(raw.numpy()))
    return offset, raw.numel()


# ----------------------------------------------------------------------------- the store


def _malloc_trim() -> Any:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give freed heap pages back to the OS. Quantizing a block leaves freed temporaries
    between the packed weights that stay; glibc keeps those holes, and without a trim
    the resident set grows by a few hundred MB per ten blocks (measured)."""
    if _TRIM is not None:
        _TRIM(0)


@contextlib.contextmanager
def reusing_freed_tensors() -> Iterator[None]:
    """Inside, freed CPU tensors of 256 KB and up are kept for the next request they fit, with
    calibration's bound (``targets.w4a8.kernels.cpu.AllocationReuse`` and
    ``calib_reuse_bytes``; the block runner installs the same around each block). For work
    outside the runner that frees and requests the same large sizes again and again: the
    rotate pass's float64 chunks were mapped and page-faulted afresh each time (Qwen2.5-0.5B's
    shape: rotate 20-24 -> 11-12 s). Nothing happens without the C++ extension loaded, or
    inside a scope that already installed it."""
    from qqq_compile.targets.w4a8.kernels.cpu import AllocationReuse, calib_reuse_bytes

    with AllocationReuse(calib_reuse_bytes()):
        yield


@dataclass
class StreamStats:
    """What streaming held in memory. Byte counts are of float weights read from disk
    and still alive (tracked until their storage is freed), in the compute dtype."""

    reads: int = 0
    bytes_read: int = 0
    spilled: int = 0  # weights a pass replaced, written to the scratch file
    bytes_spilled: int = 0
    peak_bytes: int = 0  # all streamed weights alive at once
    peak_block_bytes: int = 0  # of which inside decoder blocks
    peak_blocks: int = 0  # most decoder blocks with weights alive at once
    block_bytes: int = 0  # the largest decoder block's weights
    other_bytes: int = 0  # weights outside the blocks (embeddings, final norm, lm_head)
    total_bytes: int = 0  # every streamed weight (what loading the model would hold)
    final_bytes: int = 0  # float weights the compiled model keeps
    # Most bytes of rewritten weights a pass left in memory at its end (spilled then):
    # a pass that rewrites weights outside resident() scopes holds them all until then.
    held_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class WeightStore:
    """Float weights kept on disk, read on demand, with accounting.

    Each entry has an id; :class:`LazyWeight` tensors name it. Entries read from the
    checkpoint point into the user's files (opened read-only); entries written by
    :meth:`put` go to a scratch file that :meth:`close` deletes.
    """

    def __init__(
        self,
        *,
        cache_bytes: int = 0,
        scratch_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ):
        self.cache_bytes = cache_bytes
        # Where weights are read to (the compile's device); None: torch's default device.
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.stats = StreamStats()
        self.tracking = True
        self._src: dict[int, TensorSource] = {}
        self._dtype: dict[int, torch.dtype] = {}
        self._group: dict[int, str | None] = {}
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached = 0
        self._live: dict[int, tuple[str | None, int]] = {}
        self._token = 0
        self._scratch_parent = scratch_dir
        self._scratch: Path | None = None
        self._spill_file: Any = None

    # -- entries

    def add(self, src: TensorSource, dtype: torch.dtype, group: str | None) -> LazyWeight:
        """Register a tensor stored at ``src``, to be read as ``dtype``; ``group`` is the
        decoder block it belongs to (None outside blocks), for accounting."""
        i = len(self._src)
        self._src[i], self._dtype[i], self._group[i] = src, dtype, group
        return LazyWeight(self, i, src.shape, dtype)

    def put(self, value: torch.Tensor, group: str | None) -> LazyWeight:
        """Write ``value`` to the scratch file and return a lazy tensor reading it back."""
        if self._spill_file is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="qqq-stream-", dir=self._scratch_parent))
            self._spill_file = open(self._scratch / "spilled.bin", "wb")  # noqa: SIM115 - closed in close()
        offset, nbytes = write_tensor(self._spill_file, value)
        self._spill_file.flush()
        self.stats.spilled += 1
        self.stats.bytes_spilled += nbytes
        src = TensorSource(self._scratch / "spilled.bin", offset, nbytes, value.dtype, tuple(value.shape))
        return self.add(src, value.dtype, group)

    def group(self, i: int) -> str | None:
        return self._group[i]

    def nbytes(self, i: int) -> int:
        return self._dtype[i].itemsize * math.prod(self._src[i].shape)

    # -- reads

    def read(self, i: int, *, cache: bool = True) -> torch.Tensor:
        """The tensor of entry ``i`` (from the cache, else from disk)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        size = self.nbytes(i)
        cache = cache and size <= self.cache_bytes
        if cache and self._cached + size > self.cache_bytes:  # make room first
            while self._cached + size > self.cache_bytes:
                self._cached -= self.nbytes(self._cache.popitem(last=False)[0])
            release_memory()
        t = read_tensor(self._src[i])
        if t.dtype != self._dtype[i] or t.device != self.device:
            t = t.to(self.device, self._dtype[i])
        self._track(i, t)
        if cache:
            self._cache[i] = t
            self._cached += size
        return t

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached = 0

    def _track(self, i: int, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        self.stats.reads += 1
        self.stats.bytes_read += size
        if not self.tracking:
            return
        token = self._token = self._token + 1
        self._live[token] = (self._group[i], size)
        # Counted until the storage dies, whoever holds it (a pass, a view, the cache).
        weakref.finalize(t.untyped_storage(), self._live.pop, token, None)
        live = list(self._live.values())
        st = self.stats
        st.peak_bytes = max(st.peak_bytes, sum(s for _, s in live))
        st.peak_block_bytes = max(st.peak_block_bytes, sum(s for g, s in live if g is not None))
        st.peak_blocks = max(st.peak_blocks, len({g for g, _ in live if g is not None}))

    def close(self) -> None:
        """Drop the cache and delete the scratch files."""
        self.clear_cache()
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


class LazyWeight(torch.Tensor):
    """A weight whose data lives in a :class:`WeightStore`.

    Metadata (shape, dtype, ``dim()``) is answered without reading; any op on it reads
    the data (through the store's cache) and returns an ordinary tensor. ``detach`` and
    ``alias`` stay lazy, so ``graph.get_weight`` costs nothing until the weight is used.
    Its storage is a single element, distinct per entry, so tied weights (one object
    under two names) still show as sharing storage.
    """

    _qqq_store: WeightStore
    _qqq_id: int

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, store: WeightStore, i: int, shape: Sequence[int], dtype: torch.dtype) -> LazyWeight:
        base = torch.zeros((), dtype=dtype, device=store.device).expand(tuple(shape))
        t = torch.Tensor._make_subclass(cls, base, False)
        t._qqq_store, t._qqq_id = store, i
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        schema = func._schema.arguments
        given = [*zip([a for a in schema if not a.kwarg_only], args, strict=False)]
        for a, v in given + [(a, kwargs.get(a.name)) for a in schema]:
            if a.alias_info is not None and a.alias_info.is_write and isinstance(v, LazyWeight):
                raise RuntimeError(
                    f"{func} would modify a streamed weight in place; passes must replace weights with new "
                    "tensors (graph.set_attr / set_weight)"
                )
        if func in (aten.detach.default, aten.alias.default) and isinstance(args[0], LazyWeight):
            a = args[0]
            return LazyWeight(a._qqq_store, a._qqq_id, a.shape, a.dtype)
        args, kwargs = tree_map_only(LazyWeight, lambda t: t._qqq_store.read(t._qqq_id), (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self) -> str:  # the default repr would read the data
        return f"LazyWeight(shape={tuple(self.shape)}, dtype={self.dtype}, id={self._qqq_id})"


# ----------------------------------------------------------------------------- graph slots


def assign_attr(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``target`` as is (no Parameter wrapping: ties keep identity)."""
    *path, last = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if last in mod._parameters:
        mod._parameters[last] = value
    elif last in mod._buffers:
        mod._buffers[last] = value
    else:
        setattr(mod, last, value)


def lookup_attr(gm: GraphModule, target: str) -> Any:
    try:
        return get_attr(gm, target)
    except AttributeError:
        return None  # a pass removed it (lower drops float weights)


def as_param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


@contextlib.contextmanager
def resident(gm: GraphModule, targets: Iterable[str]) -> Iterator[None]:
    """Read the lazy weights among ``targets`` into ``gm`` for the duration of the block.

    On exit each one goes back to disk: unchanged weights simply become lazy again; a
    weight a pass replaced (never in place) is first written to the store's scratch
    file. Re-entrant, and free when nothing in ``targets`` is lazy (graphs that do not
    stream).
    """
    lazy = {t: v for t in targets if isinstance(v := lookup_attr(gm, t), LazyWeight)}
    if not lazy:
        yield
        return
    placed: dict[str, tuple[LazyWeight, weakref.ref]] = {}
    objs: dict[int, torch.nn.Parameter] = {}
    for t, lz in lazy.items():
        store = lz._qqq_store
        if lz._qqq_id not in objs:
            store.clear_cache()  # the block is resident now: one copy is enough
            objs[lz._qqq_id] = as_param(store.read(lz._qqq_id, cache=False))
        assign_attr(gm, t, objs[lz._qqq_id])
        placed[t] = (lz, weakref.ref(objs[lz._qqq_id]))
    del objs
    try:
        yield
    finally:
        spilled: dict[int, LazyWeight] = {}
        for t, (lz, ref) in placed.items():
            cur = lookup_attr(gm, t)
            if cur is None or isinstance(cur, LazyWeight):
                continue
            if cur is ref():
                assign_attr(gm, t, lz)
            else:  # replaced by a pass: keep the new value, on disk
                if id(cur) not in spilled:
                    spilled[id(cur)] = lz._qqq_store.put(cur.detach(), lz._qqq_store.group(lz._qqq_id))
                assign_attr(gm, t, spilled[id(cur)])
        del cur, spilled
        release_memory()


def attr_targets(nodes: Iterable[torch.fx.Node]) -> set[str]:
    """Attribute names that ``nodes`` consume. The get_attr nodes themselves are left
    out: export puts them all at the top of the graph, far from their users."""
    return {a.target for n in nodes if n.op != "get_attr" for a in n.all_input_nodes if a.op == "get_attr"}
