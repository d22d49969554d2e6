"""The generation runtime: a prefill/decode step built from a lowered graph.

:func:`build_step` applies the KV-cache rewrite (:mod:`qqq_compile.runtime.kv_cache`) to the graph the
pipeline produced and returns a :class:`DecodeStep` that runs it one of two ways:

* ``"eager"``: the FX graph node by node in Python. The reference, and the fallback.
* ``"aot"``: the graph exported and compiled with AOTInductor
  (``torch._inductor.aoti_compile_and_package``): elementwise chains (RMSNorm, RoPE,
  SiLU·mul, residual adds) fuse into C++ loops and the W4A8 ops are C++ dispatcher calls,
  so a decode step pays no Python per op. The package is cached on disk, keyed by the
  graph, the cache size, the torch version and the CPU, and rebuilt when any of them
  changes.

The graph is functionalised (``run_decompositions``) before AOTInductor sees it: the KV
writes then reach it as buffer mutations, which it orders and performs in place.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch.fx import GraphModule

from qqq_compile.compiler.pipeline import CompileContext
from qqq_compile.runtime.kv_cache import CacheSpec, add_kv_cache
from qqq_compile.targets.w4a8.fuse_linears import FuseLinears

RUNTIMES = ("eager", "aot")
# How the graph is exported for AOTInductor; part of the package key, so a change rebuilds.
EXPORT_RECIPE = "cache_row+size_oblivious"


def _cpu_id() -> str:
    """The CPU model and flags: an AOT package is native code for this CPU only."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def package_key(gm: GraphModule, max_batch: int, max_len: int) -> str:
    """Hash of everything an AOT package depends on: graph code, tensor shapes and dtypes,
    cache size, torch version and CPU. Weight values are constants of the package too, so
    their bytes are hashed (cheap next to an AOT compile)."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for name, t in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    h.update(f"{max_batch}:{max_len}:{torch.__version__}:{_cpu_id()}:{EXPORT_RECIPE}".encode())
    return h.hexdigest()[:24]


def default_package_dir() -> Path:
    root = os.environ.get("QQQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qqq_compile")
    return Path(root) / "aot"


@dataclass
class DecodeStep:
    """``step(input_ids [B, T], attention_mask [B, L], cache_position [T], cache_row=0) -> logits [B, 1, V]``.

    The batch uses cache rows ``cache_row .. cache_row + B - 1`` (default: the first ``B``)."""

    runtime: str
    spec: CacheSpec
    fn: Any
    graph_module: GraphModule
    package_path: str | None = None
    build_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor, cache_row: int = 0
    ) -> Any:
        rows = input_ids.shape[0]
        if not 0 <= cache_row <= self.spec.max_batch - rows:
            raise ValueError(
                f"cache rows {cache_row}..{cache_row + rows - 1} are outside the {self.spec.max_batch} rows "
                f"this step's KV cache holds"
            )
        row = torch.tensor(cache_row, dtype=torch.long)
        with torch.no_grad():
            return self.fn(input_ids.contiguous(), attention_mask.contiguous(), cache_position.contiguous(), row)


def _ensure_cpp_kernels() -> bool:
    """Load the C++ W4A8 kernels before a compiled package runs (it calls them through
    the dispatcher). Without them (a CPU without VNNI) the ops run their torch reference."""
    from qqq_compile.targets.w4a8.kernels import ensure_cpp_kernels

    return ensure_cpp_kernels()


def _aot_compile(cached: GraphModule, spec: CacheSpec, path: Path, progress: bool) -> None:
    from torch.export import Dim

    b, t = spec.max_batch, spec.max_len
    batch = Dim("batch", min=1, max=b) if b > 1 else None  # a 1-row cache: batch stays static
    seq = Dim("seq", min=1, max=t)
    kv = Dim("kv", min=1, max=t)
    example = (
        torch.zeros(b, 2, dtype=torch.long),
        torch.ones(b, 2, dtype=torch.long),
        torch.arange(2),
        torch.tensor(0),  # cache_row: data-dependent (see kv_cache._first_row)
    )
    dyn = ({0: batch, 1: seq} if batch else {1: seq}, {0: batch, 1: kv} if batch else {1: kv}, {0: seq}, None)
    if progress:
        print(f"qqq_compile: AOT-compiling the decode step (once; cached at {path}) ...", flush=True)
    with torch.no_grad():
        # Size-oblivious: a dynamic batch ranges over [1, max_batch] in export's reasoning (by
        # default it assumes >= 2, and would then fold the cache_row clamp of a 2-row cache to 0).
        with fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(cached, example, dynamic_shapes=dyn, strict=False)
        # Functionalise: KV writes become buffer mutations AOTInductor performs in place. SDPA
        # stays whole: its CPU flash kernel reads the KV heads directly (GQA), where the math
        # decomposition would copy the cache into every query head each step.
        table = torch.export.default_decompositions()
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        ep = ep.run_decompositions(table)
        tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # must still end in .pt2
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    os.replace(tmp, path)  # atomic: a killed compile never leaves a half-written package


def build_step(
    gm: GraphModule,
    *,
    max_batch: int,
    max_len: int,
    runtime: str = "eager",
    package_dir: str | os.PathLike | None = None,
    progress: bool = True,
    cache_dtype: torch.dtype | None = None,
) -> DecodeStep:
    """Rewrite ``gm`` for a KV cache of ``max_batch`` rows and ``max_len`` positions and
    return the step for ``runtime`` (``"eager"`` or ``"aot"``); ``cache_dtype``: see
    :func:`~qqq_compile.runtime.kv_cache.add_kv_cache`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not known; use one of {RUNTIMES}")
    t0 = time.perf_counter()
    cached, spec = add_kv_cache(gm, max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype)
    # One kernel call per group of projections reading one input (q/k/v, gate/up): exact,
    # and at one token per step the per-call costs are a large share of each GEMV.
    ctx = CompileContext()
    FuseLinears()(cached, ctx)
    notes = [n.message for n in ctx.notes]
    # Load (on first use: build) the C++ kernels here, for both runtimes, so that their
    # one-time build is part of building the step and never of the first timed prefill.
    if not _ensure_cpp_kernels():
        notes.append("C++ W4A8 kernels unavailable: the step calls the Python kernels")
    if runtime == "eager":
        return DecodeStep("eager", spec, cached, cached, build_seconds=time.perf_counter() - t0, notes=notes)
    folder = Path(package_dir) if package_dir is not None else default_package_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{package_key(cached, max_batch, max_len)}.pt2"
    if path.exists():
        notes.append(f"reused the AOT package {path}")
    else:
        _aot_compile(cached, spec, path, progress)
        notes.append(f"compiled the AOT package {path}")
    runner = torch._inductor.aoti_load_package(str(path))
    return DecodeStep("aot", spec, runner, cached, str(path), time.perf_counter() - t0, notes)


__all__ = ["RUNTIMES", "DecodeStep", "build_step", "default_package_dir", "package_key"]
