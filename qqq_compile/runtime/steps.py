"""The generation runtime: a prefill/decode step built from a lowered graph.

:func:`build_step` applies the KV-cache rewrite (:mod:`qqq_compile.runtime.kv_cache`) to the graph the
pipeline produced and returns a :class:`DecodeStep` that runs it one of two ways:

* ``"eager"``: the FX graph node by node in Python. The reference, and the fallback.
* ``"aot"``: the graph exported and compiled with AOTInductor
  (``torch._inductor.aoti_compile_and_package``): elementwise chains (RMSNorm, RoPE,
  SiLU·mul, residual adds) fuse into C++ loops and the W4A8 ops, attention and the online
  Hadamard are direct calls into the C++ kernels (their C shims, ``Target.aot_c_shims``; the
  torch kernels through AOTInductor's proxy executor when the C++ ones are not loaded), so a
  decode step pays no Python per op.

An AOT package holds **code only** (``aot_inductor.package_constants_in_so=False``): no
weights and no KV cache. After loading it, :func:`load_package` hands the runner the graph's
own tensors with ``load_constants(..., user_managed=True)``: the runner keeps their
pointers, so the weights exist once in memory (the graph module's, i.e. the artifact's) and
the runner writes the KV cache into the step's own buffers. A package is named by
:func:`package_key`: the graph code, every tensor's name, shape, stride and dtype, the
values of the tiny tensors Inductor writes into the code as literals (e.g. RoPE's
``inv_freq`` of a small head), the cache size, the torch version and the CPU. Weight values are not part
of it: the package does not hold them. A ``<key>.json`` beside each package records the
CPU and torch it was built for, so a rebuild can say why it happens.

The compile runs in a child process (:mod:`qqq_compile.runtime.aot_build`), which gets the graph
without its weights; the process that generates never holds the compiler's memory.

The graph is functionalised (``run_decompositions``) before AOTInductor sees it: the KV
writes then reach it as buffer mutations, which it performs in place (in our buffers).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.errors import QQQError
from qqq_compile.runtime.aot_build import EXPORT_RECIPE, c_shims, compile_in_child, graph_tensors, inlined
from qqq_compile.runtime.kv_cache import CacheSpec, add_kv_cache, graph_device
from qqq_compile.targets.registry import graph_targets

RUNTIMES = ("eager", "aot")
# Bumped whenever the package layout or what the key covers changes: old packages are then
# never picked up (their key differs) and get rebuilt once.
_PACKAGE_FORMAT = "qqq-step-2:constants-outside"


class StepError(QQQError, RuntimeError):
    """A decode step cannot be built or loaded; the message names the cause and the fix."""


def cpu_id() -> str:
    """The CPU model and a hash of its flags: an AOT package is native code for this CPU only."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


_cpu_id = cpu_id  # the older name (tests patch it)


def package_key(gm: GraphModule, max_batch: int, max_len: int) -> str:
    """Hash of everything an AOT package depends on (see the module docstring)."""
    h = hashlib.sha256(_PACKAGE_FORMAT.encode())
    h.update(gm.code.encode())
    for name, t in sorted(graph_tensors(gm).items()):
        h.update(f"{name}:{tuple(t.shape)}:{tuple(t.stride())}:{t.dtype}".encode())
        if inlined(t):
            h.update(t.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy().tobytes())  # host: hashing
    h.update(f"{max_batch}:{max_len}:{torch.__version__}:{cpu_id()}:{EXPORT_RECIPE}".encode())
    # A package that calls the C++ kernels' C shims needs them loaded; one that goes through
    # the proxy executor does not: they are different packages.
    h.update(",".join(sorted(str(op) for op in c_shims(gm))).encode())
    return h.hexdigest()[:24]


def default_package_dir() -> Path:
    """``$QQQ_CACHE/aot`` (default ``~/.cache/qqq_compile/aot``): packages of steps built
    from graphs that are not (or not writably) an artifact's."""
    root = os.environ.get("QQQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qqq_compile")
    return Path(root) / "aot"


@dataclass(eq=False)  # a step is a resource: equal only to itself
class DecodeStep:
    """``step(input_ids [B, T], attention_mask [B, L], cache_position [T], cache_row=0) -> logits [B, 1, V]``.

    The batch uses cache rows ``cache_row .. cache_row + B - 1`` (default: the first ``B``).
    ``calls`` counts the calls that ran (prefill and decode alike)."""

    runtime: str
    spec: CacheSpec
    fn: Any
    graph_module: GraphModule
    package_path: str | None = None
    build_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    compiled: bool = False  # True when building this step ran an AOT compile
    calls: int = 0

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor, cache_row: int = 0
    ) -> Any:
        rows = input_ids.shape[0]
        if not 0 <= cache_row <= self.spec.max_batch - rows:
            raise ValueError(
                f"cache rows {cache_row}..{cache_row + rows - 1} are outside the {self.spec.max_batch} rows "
                f"this step's KV cache holds"
            )
        row = torch.tensor(cache_row, dtype=torch.long, device=input_ids.device)
        self.calls += 1
        with torch.no_grad():
            return self.fn(input_ids.contiguous(), attention_mask.contiguous(), cache_position.contiguous(), row)

    @property
    def device(self) -> torch.device:
        """Where the step's weights and KV cache live: its inputs are made there."""
        return graph_device(self.graph_module)

    def describe(self) -> str:
        """``"aot 1x2048"``: runtime, rows x positions."""
        return f"{self.runtime} {self.spec.max_batch}x{self.spec.max_len}"


class _Runner:
    """An AOTInductor package loaded with the step's own tensors as its constants.

    Calls the package loader directly (what ``AOTICompiledModel.__call__`` does, without
    re-reading the call spec every step); the constants stay owned by the step's graph
    module, which this object keeps alive."""

    def __init__(self, loader: Any, owner: GraphModule):
        self.loader = loader
        self.owner = owner

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        (out,) = self.loader.boxed_run(list(inputs))
        return out


def _share_fused_storage(cached: GraphModule) -> None:
    """One copy of each weight: the projections ``fuse_linears`` concatenated become views
    into the fused tensor (same values; the separate copies are freed). When they already
    are consecutive views of one storage (a second step built from one graph), the fused tensor
    becomes a view of that storage instead of a third copy."""
    sources: dict[str, list[str]] = cached.meta.get("qqq_fused_sources", {})
    with torch.no_grad():
        for name, targets in sources.items():
            fused = getattr(cached, name)
            parts = [_get(cached, t) for t in targets]
            if any(p is None or not p.is_contiguous() or p.dtype != fused.dtype for p in parts):
                continue
            if _consecutive(parts):
                fused.set_(parts[0].untyped_storage(), parts[0].storage_offset(), fused.shape, fused.stride())
                continue
            start = 0
            for p in parts:
                rows = p.shape[0]
                p.set_(fused.untyped_storage(), fused.storage_offset() + start * fused.stride(0), p.shape, p.stride())
                start += rows


def _get(gm: GraphModule, target: str) -> torch.Tensor | None:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _consecutive(parts: list[torch.Tensor]) -> bool:
    ptr = parts[0].untyped_storage().data_ptr()
    end = parts[0].storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != ptr or p.storage_offset() != end:
            return False
        end += p.numel()
    return True


def _aot_compile(cached: GraphModule, spec: CacheSpec, path: Path) -> None:
    """Compile ``cached``'s code-only package at ``path``, in a child process: the compile's
    memory leaves with it (:mod:`qqq_compile.runtime.aot_build`)."""
    compile_in_child(cached, spec, path)


def load_package(path: str | os.PathLike, cached: GraphModule) -> _Runner:
    """Load a code-only package and give it ``cached``'s tensors (not copied) as constants."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    tensors = graph_tensors(cached)
    fqns = list(loader.get_constant_fqns())
    missing = [f for f in fqns if f not in tensors]
    if missing:
        raise StepError(
            f"the AOT package {path} expects tensors {missing[:3]} that this graph lacks: it was built from another "
            "graph; delete it and it is rebuilt"
        )
    # user_managed: the runner keeps these pointers (no copy); the graph module owns them.
    loader.load_constants({f: tensors[f] for f in fqns}, False, True, True, False)
    return _Runner(loader, cached)


def _package_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return os.access(probe, os.W_OK)


def _why_rebuild(folders: list[Path], kind: dict[str, Any]) -> str:
    """What the packages of this step's size and cache dtype in this graph's own folders (an
    artifact's) were built for; empty when there are none. (A record without a cache dtype
    is older than that field and may be either dtype's.)"""
    shared = default_package_dir().resolve()
    for folder in folders:
        if folder.resolve() == shared:
            continue  # the cache holds packages of every graph ever built: no hint there
        for p in sorted(folder.glob("[!.]*.pt2")) if folder.is_dir() else []:  # not a compile's .tmp file
            info = _package_info(p)
            if any(info.get(k, kind[k]) != kind[k] for k in ("max_batch", "cache_dtype")):
                continue
            if info.get("max_len") != kind["max_len"]:
                continue
            if info.get("torch") != kind["torch"] or info.get("cpu") != kind["cpu"]:
                return (
                    f"the decode step in {folder} was built for torch {info.get('torch', '?')} on "
                    f"{str(info.get('cpu', '?')).split('|')[0] or 'another CPU'}; this is torch {kind['torch']} on "
                    f"{kind['cpu'].split('|')[0] or 'this CPU'}"
                )
            return f"the decode step in {folder} was built from another graph (another qqq_compile version)"
    return ""


def find_or_build_package(
    cached: GraphModule,
    spec: CacheSpec,
    folders: Sequence[Path],
    progress: bool = True,
    allow_compile: bool = True,
    into: Path | None = None,
    shown_as: Path | None = None,
) -> tuple[Path, bool, list[str]]:
    """``(path, compiled, notes)``: the package for ``cached`` from the first of ``folders``
    that has it, else compiled into ``into`` (default: the first writable folder).
    ``shown_as``: the folder the progress line names (where the package will end up)."""
    key = package_key(cached, spec.max_batch, spec.max_len)
    kind = _step_kind(cached, spec)
    for folder in folders:
        path = folder / f"{key}.pt2"
        if path.is_file():
            _complete_record(path, kind)
            return path, False, [f"reused the AOT package {path}"]
    target = into or next((f for f in folders if _writable(f)), None)
    if target is None:
        raise StepError(
            f"no writable folder for the decode step's AOT package among {[str(f) for f in folders]}; "
            "set QQQ_CACHE to a writable folder"
        )
    why = _why_rebuild(list(folders), kind)
    if not allow_compile:
        raise StepError(f"no AOT package for this decode step in {[str(f) for f in folders]} ({why or 'none built'})")
    notes = [f"rebuilding the decode step once for this machine: {why}"] if why else []
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{key}.pt2"
    if progress:
        reason = f" ({why})" if why else ""
        print(
            f"qqq_compile: building the decode step for this CPU and torch{reason}; once, typically 1-3 minutes; "
            f"kept in {shown_as or target} ...",
            flush=True,
        )
    t0 = time.perf_counter()
    _aot_compile(cached, spec, path)
    seconds = time.perf_counter() - t0
    _write_record(path, {**kind, "build_seconds": round(seconds, 1)})
    if progress:
        print(f"qqq_compile: decode step built in {seconds:.0f} s", flush=True)
    notes.append(f"compiled the AOT package {path} in {seconds:.0f} s")
    notes += _drop_superseded(path, kind)
    return path, True, notes


def _step_kind(cached: GraphModule, spec: CacheSpec) -> dict[str, Any]:
    """What a package serves, beside its key: the machine, the cache's size and dtype. Two
    packages of one kind in an artifact's folder are two builds of one step from different
    graphs (a qqq_compile upgrade): the newer one supersedes the other."""
    k0 = _get(cached, "qqq_k_cache_0")
    return {
        "cpu": cpu_id(),
        "torch": torch.__version__,
        "max_batch": spec.max_batch,
        "max_len": spec.max_len,
        "cache_dtype": str(k0.dtype).removeprefix("torch.") if k0 is not None else None,
    }


def _complete_record(path: Path, kind: dict[str, Any]) -> None:
    """Add what an older record lacks (the cache dtype) once its package is matched by key:
    the key covers the graph, so the facts are now known, and the superseding rule can
    apply to this package later. Best effort: a read-only folder keeps the old record."""
    info = _package_info(path)
    if not info or all(k in info for k in kind):
        return
    try:
        _write_record(path, {**kind, **info})
    except OSError:
        pass


def _write_record(path: Path, info: dict[str, Any]) -> None:
    """``<key>.json`` beside the package ``path``, written atomically."""
    tmp = path.with_name(f".tmp{os.getpid()}-{path.stem}.json")
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path.with_suffix(".json"))


def _drop_superseded(path: Path, kind: dict[str, Any]) -> list[str]:
    """Delete the packages in ``path``'s folder that ``path`` replaces: same CPU, torch,
    rows, positions and cache dtype, another key. Only in an artifact's own folder: the
    shared cache holds packages of every graph ever built, and nothing says which are dead.
    A package whose record lacks the cache dtype (older than this rule) is kept: it may be
    the other cache dtype's step. A process still running a deleted package keeps its
    mapping (POSIX unlink)."""
    folder = path.parent
    if folder.resolve() == default_package_dir().resolve():
        return []
    dropped = []
    for old in sorted(folder.glob("[!.]*.pt2")):
        if old == path:
            continue
        info = _package_info(old)
        if all(info.get(k, object()) == v for k, v in kind.items()):
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            dropped.append(old.name)
    return [f"removed {len(dropped)} superseded package(s) of this step from {folder}: {dropped}"] if dropped else []


def step_graph(
    gm: GraphModule,
    max_batch: int,
    max_len: int,
    cache_dtype: torch.dtype | None = None,
    bf16_attention: bool = True,
) -> tuple[GraphModule, CacheSpec, list[str]]:
    """``(step graph, cache spec, notes)``: ``gm`` with a KV cache, rewritten for decoding by
    the targets whose ops it calls (``Target.prepare_step``: W4A8 fuses the projections that
    share an input, one kernel call each), their kernels loaded."""
    cached, spec = add_kv_cache(
        gm, max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype, bf16_attention=bf16_attention
    )
    notes: list[str] = []
    # Kernels are loaded (on first use: built) here, for both runtimes, so that their one-time
    # build is part of building the step and never of the first timed prefill.
    for target in graph_targets(cached):
        notes += target.prepare_step(cached)
    _share_fused_storage(cached)
    return cached, spec, notes


def ship_step(
    gm: GraphModule,
    folder: str | os.PathLike,
    *,
    max_batch: int,
    max_len: int,
    reuse: Sequence[str | os.PathLike] = (),
    progress: bool = True,
    shown_as: Path | None = None,
) -> dict[str, Any]:
    """Put the AOT package of ``gm``'s decode step into ``folder`` (an artifact being
    written; ``shown_as``: its final place, for the progress line): copied from ``reuse``
    folders when one holds it, else compiled. Returns the facts an artifact's manifest
    records about it."""
    import shutil

    cached, spec, _ = step_graph(gm, max_batch, max_len)
    dest = Path(folder)
    path, compiled, _ = find_or_build_package(
        cached, spec, [Path(r) for r in reuse], progress, into=dest, shown_as=shown_as
    )
    if path.parent != dest:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / path.name)
        _write_record(dest / path.name, {**_step_kind(cached, spec), **_package_info(path)})
    return {
        "package": path.name,
        "max_batch": max_batch,
        "max_len": max_len,
        "cpu": cpu_id(),
        "torch": torch.__version__,
        "compiled": compiled,
    }


def build_step(
    gm: GraphModule,
    *,
    max_batch: int,
    max_len: int,
    runtime: str = "eager",
    package_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    progress: bool = True,
    allow_compile: bool = True,
    cache_dtype: torch.dtype | None = None,
    bf16_attention: bool = True,
) -> DecodeStep:
    """Rewrite ``gm`` for a KV cache of ``max_batch`` rows and ``max_len`` positions and
    return the step for ``runtime`` (``"eager"`` or ``"aot"``).

    ``package_dir``: a folder, or folders searched in order, for the AOT package; a new one
    is compiled into the first writable folder (default: :func:`default_package_dir`).
    ``allow_compile=False`` raises :class:`StepError` instead of compiling. ``cache_dtype``,
    ``bf16_attention``: see :func:`~qqq_compile.runtime.kv_cache.add_kv_cache`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not known; use one of {RUNTIMES}")
    t0 = time.perf_counter()
    cached, spec, notes = step_graph(gm, max_batch, max_len, cache_dtype, bf16_attention)
    if runtime == "eager":
        return DecodeStep("eager", spec, cached, cached, build_seconds=time.perf_counter() - t0, notes=notes)
    if package_dir is None:
        folders = [default_package_dir()]
    elif isinstance(package_dir, (str, os.PathLike)):
        folders = [Path(package_dir)]
    else:
        folders = [Path(p) for p in package_dir]
    path, compiled, more = find_or_build_package(cached, spec, folders, progress, allow_compile)
    runner = load_package(path, cached)
    return DecodeStep("aot", spec, runner, cached, str(path), time.perf_counter() - t0, notes + more, compiled)


__all__ = [
    "RUNTIMES",
    "DecodeStep",
    "StepError",
    "build_step",
    "cpu_id",
    "default_package_dir",
    "find_or_build_package",
    "load_package",
    "package_key",
    "ship_step",
    "step_graph",
]
