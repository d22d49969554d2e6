"""CPU path of the ``torch.ops.qqq.*`` kernels: the C++ extension and the pure-torch reference.

W4A8 (QQQ): per-token int8 activations x packed int4 weights (layout in
:mod:`qqq_compile.targets.w4a8.formats`); W8A8 (``qqq::w8a8_linear``, for the lm_head): int8 weights with
a per-output-channel scale. Every path computes the exact int32 accumulator ``xq @ W8.T``
and then ``((acc * s_token) * s_ch) + bias`` in fp32, cast to the output dtype, so all paths
agree bit for bit with the pure-torch reference.

Two implementations:

* a C++ extension (``csrc/*.cpp``, AVX512-VNNI) that **registers itself with the dispatcher**
  (``TORCH_LIBRARY_IMPL(qqq, CPU, m)``): once loaded, every caller (eager, ``torch.compile``,
  an AOTInductor package's C++) reaches it without Python. It is compiled with
  ``torch.utils.cpp_extension.load`` by :func:`ensure_cpp_kernels` (about 60 s the first
  time, then cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; a
  cached load takes about a second). For small ``M`` it runs a GEMV/GEMM that reads the
  packed bytes directly; for large ``M`` it unpacks W8 once per call and hands the GEMM to
  oneDNN through ``torch._int_mm`` (W8A8: the VNNI kernel below 16 tokens, else ``_int_mm``
  on the int8 weight as stored; ``torch.ops.qqq_cpu.w8a8_linear_path`` forces either).
* the pure-torch reference (``*_torch`` below), registered by :mod:`.ops` for every device
  as the ops' ``CompositeExplicitAutograd`` kernel. A CPU tensor only reaches it when no
  C++ CPU kernel is registered: before the first call has loaded the extension (it then
  loads it), or when the CPU lacks AVX512-VNNI/VBMI, the build fails (both warn) or
  ``QQQ_CPU_KERNEL=torch`` is set. It unpacks int4 at every call: 10-500x slower.

The extension is loaded lazily, not at import, so that ``import qqq_compile`` stays fast:
call :func:`ensure_cpp_kernels` before ``torch._inductor.aoti_load_package`` (or before
timing anything) to have the C++ kernels registered from the start.

Why this design (single-thread CPU time, K=N=4096, int8 group scales, Zen 5; see
``benchmarks/cpu_linear.py`` for the full table): at M=1 the packed kernel takes 0.13 ms
(per-channel 0.10, fp16 groups 0.16) vs 0.11 ms for onnxruntime MatMulNBits and 2.7 ms for
fp32; unpack-in-torch + ``_int_mm`` takes 24-190 ms and ``aten._dyn_quant_matmul_4bit``
(a reference path on x86) 19 ms. At M=16: 0.8 ms vs 3.8 ms for C++ unpack + ``_int_mm``
(oneDNN reorders the weight on every call). At M=512, oneDNN wins (23 ms vs 27 ms) and the
C++ unpack adds only ~0.4 ms, hence the dispatch in :func:`use_packed_kernel`.

No weight-dependent state is cached: the kernels need no prepacking.

Threads: the GEMV/GEMM loops share 32-row blocks through an atomic counter and, when a call
finds the other cores busy (libgomp's fork or join waited > 0.2 ms), run the next calls on
the calling thread alone for a doubling back-off (``csrc/parallel_cpu.cpp``): on a loaded
2-core machine a 4096x4096 GEMV otherwise waited ~28 ms (median) for a descheduled OpenMP
thread. :func:`cpp_path_counts` shows which path and threading each call took.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from qqq_compile.targets.w4a8.formats import PackedW4, quantize_act_per_token

__all__ = [
    "OP_NAMES",
    "PATH_NAMES",
    "cpp_call_counts",
    "cpp_path_counts",
    "cpu_has_bf16",
    "cpu_kernel_source",
    "cpu_supports_kernels",
    "ensure_cpp_kernels",
    "extension_available",
    "int8_weight",
    "quantize_act_torch",
    "rmsnorm_quant_torch",
    "use_packed_kernel",
    "w4a8_linear_q_torch",
    "w4a8_linear_torch",
    "w8a8_linear_torch",
]

OP_NAMES = ("quantize_act", "rmsnorm_quant", "w4a8_linear", "w4a8_linear_q", "w8a8_linear")
# The C++ kernels' paths, in the order of qqq::Path (csrc/qqq_cpu.h): W4A8 packed GEMV (one
# token), packed GEMM (a few tokens), unpack + torch._int_mm (many tokens); the same for W8A8;
# then how the parallel GEMV/GEMM loops ran: by the OpenMP team, on the calling thread alone
# (back-off after a stalled join), and team runs whose join stalled (csrc/parallel_cpu.cpp).
PATH_NAMES = (
    "w4a8_gemv",
    "w4a8_gemm_packed",
    "w4a8_int_mm",
    "w8a8_gemv",
    "w8a8_gemm_vnni",
    "w8a8_int_mm",
    "team",
    "solo",
    "stall",
    "attention_bf16kv",
    "attention_f32kv",
    "kron_transform",
    "attention_prefill",
    "hessian_stage",
    "attention_prefill_bf16",
    "gptq_block",
    "hessian_gemm",
)


def use_packed_kernel(m: int, k: int) -> bool:
    """Whether ``m`` tokens go to the VNNI kernel rather than (unpack +) ``torch._int_mm``.

    oneDNN's int8 GEMM wins for many tokens, but each call pays for unpacking W8 and
    reordering it (cost ~ K*N), which the packed kernel never does. The measured crossover
    (2-core AVX512-VNNI Zen) grows with K: ~16 tokens at K=576, ~64 at K=2048, ~128 at K=4096.
    The C++ dispatcher applies the same rule (``use_packed`` in csrc/act_cpu.cpp).
    """
    return k < 2 or m < max(16, min(k // 32, 128))


_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (
    "act_cpu.cpp",
    "w4a8_cpu.cpp",
    "w8a8_cpu.cpp",
    "parallel_cpu.cpp",
    "attention_cpu.cpp",
    "attention_prefill_cpu.cpp",
    "hadamard_cpu.cpp",
    "hessian_cpu.cpp",
    "hessian_gemm_cpu.cpp",
    "gptq_cpu.cpp",
    "ops_cpu.cpp",
    "alloc_cpu.cpp",
)
_EXT_NAME = "qqq_cpu_kernels"
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi", "f16c")
# The loaded extension's ops namespace ``torch.ops.qqq_cpu`` (or None: torch fallback), per
# process. Loading registers kernels with the dispatcher, a process-wide effect that cannot
# be undone, so it happens once and is remembered here.
_ext_state: dict[str, Any] = {}
_ext_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_kernels() -> bool:
    """Whether this CPU has every ISA extension the C++ kernels are built for."""
    return all(f in _cpu_flags() for f in _REQUIRED_FLAGS)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (the kernels that use it check again in C++)."""
    return "avx512_bf16" in _cpu_flags()


def _torch_forced() -> bool:
    return os.environ.get("QQQ_CPU_KERNEL", "").lower() in ("torch", "0", "off")


def _load_extension() -> Any:
    """Build (or load the cached build of) the extension and return ``torch.ops.qqq_cpu``;
    None, with a warning, if it cannot."""
    if _torch_forced():
        return None
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        warnings.warn(f"qqq_compile: CPU lacks {missing}; using the slower pure-torch CPU kernels", stacklevel=3)
        return None
    try:
        from torch.utils.cpp_extension import load

        # A build takes a minute or more, silently, inside whatever pass first needs a
        # kernel (GPTQ's progress bar sat at 0/30 for 38 s): say so once, on stderr.
        build_dir = _needs_build()
        if build_dir is not None:
            print(
                f"qqq_compile: building the C++ CPU kernels once for this machine "
                f"(about a minute on 2 cores; cached in {build_dir}) ...",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.perf_counter()
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi", "-mf16c"]
        # A plain shared library (no pybind): loading it runs its TORCH_LIBRARY registrations.
        lib_path = load(
            name=_EXT_NAME,
            sources=[str(_CSRC / s) for s in _SOURCES],
            # -ffp-contract=off: no FMA contraction, so the epilogue rounds like torch.
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *isa],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        if build_dir is not None:
            seconds = time.perf_counter() - t0
            print(f"qqq_compile: C++ CPU kernels built in {seconds:.0f} s", file=sys.stderr, flush=True)
        _register_fakes()
        # Global symbols: AOT packages built with AOTI_SHIMS call its C functions by name.
        # Without them the packages go through the proxy executor (aoti_c_shims() is empty).
        try:
            ctypes.CDLL(str(lib_path), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
            _ext_state["global"] = True
        except OSError:
            _ext_state["global"] = False
        return torch.ops.qqq_cpu
    except Exception as e:  # compiler missing, build error, ...
        warnings.warn(
            f"qqq_compile: could not build the CPU kernel extension ({type(e).__name__}: {e}); "
            "using the slower pure-torch path",
            stacklevel=3,
        )
        return None


def _needs_build() -> Path | None:
    """The extension's build folder if loading it will (re)build it: no library there yet, or
    one older than a file of ``csrc/``. (torch also rebuilds on a change of flags, which this
    cannot see; then the build is only silent.) None if a cached build will be loaded."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private; a missing one only loses the note

        folder = Path(_get_build_directory(_EXT_NAME, False))
    except Exception:
        return None
    lib = folder / f"{_EXT_NAME}.so"
    if not lib.is_file():
        return folder
    try:
        newest = max(f.stat().st_mtime for f in _CSRC.iterdir() if f.is_file())  # sources and headers
    except (OSError, ValueError):  # no csrc/: the build will fail and say so itself
        return None
    return folder if lib.stat().st_mtime < newest else None


def _register_fakes() -> None:
    """Shape functions of the extension's ops whose schema it defines without a kernel for
    every key (torch.export traces them with fake tensors)."""

    def attention_fake(q, k, v, mask, scale, bf16_dot=False):
        b, h, t, d = q.shape
        return q.new_empty(b, t, h, d).transpose(1, 2)  # torch's CPU SDPA output layout

    torch.library.register_fake("qqq_cpu::attention_bf16kv")(attention_fake)
    torch.library.register_fake("qqq_cpu::attention_f32kv")(attention_fake)
    torch.library.register_fake("qqq_cpu::kron_transform")(lambda x, factors, sizes: x.new_empty(x.shape))
    torch.library.register_fake("qqq_cpu::attention_mask")(
        lambda valid, pos: valid.new_empty((valid.shape[0], 1, pos.shape[0], valid.shape[1]), dtype=torch.bool)
    )


def _ext() -> Any:
    """``torch.ops.qqq_cpu`` (the C++ kernels), built on first use; ``None``: torch fallback."""
    if "mod" not in _ext_state:
        with _ext_lock:
            if "mod" not in _ext_state:
                _ext_state["mod"] = _load_extension()
    return _ext_state["mod"]


def ensure_cpp_kernels() -> bool:
    """Load the C++ extension, which registers the ``qqq::*`` CPU kernels with the dispatcher.

    Returns whether the C++ kernels are active. Idempotent; the first call in a process may
    build the extension (about a minute, then cached). ``QQQ_CPU_KERNEL=torch`` (read on the
    first call) keeps the pure-torch kernels.
    """
    return _ext() is not None


# The extension's AOTInductor C shims (csrc/ops_cpu.cpp, which must match these declarations):
# an AOT package built with them (``aot_inductor.custom_ops_to_c_shims``) calls each op's C
# function directly instead of through its proxy executor (an IValue stack and a boxed
# dispatcher call per op). Keyed by op name; the name of each function is AOTInductor's
# ``aoti_torch_cpu_<op>``.
AOTI_SHIMS = {
    "qqq::w4a8_linear": "AOTITorchError aoti_torch_cpu_w4a8_linear(AtenTensorHandle, AtenTensorHandle, "
    "AtenTensorHandle, AtenTensorHandle*, AtenTensorHandle*, int64_t, AtenTensorHandle*)",
    "qqq::w4a8_linear_q": "AOTITorchError aoti_torch_cpu_w4a8_linear_q(AtenTensorHandle, AtenTensorHandle, "
    "AtenTensorHandle, AtenTensorHandle, AtenTensorHandle*, AtenTensorHandle*, int64_t, int32_t, AtenTensorHandle*)",
    "qqq::w8a8_linear": "AOTITorchError aoti_torch_cpu_w8a8_linear(AtenTensorHandle, AtenTensorHandle, "
    "AtenTensorHandle, AtenTensorHandle*, AtenTensorHandle*)",
    "qqq_cpu::attention_f32kv": "AOTITorchError aoti_torch_cpu_attention_f32kv(AtenTensorHandle, AtenTensorHandle, "
    "AtenTensorHandle, AtenTensorHandle, double, int32_t, AtenTensorHandle*)",
    "qqq_cpu::attention_bf16kv": "AOTITorchError aoti_torch_cpu_attention_bf16kv(AtenTensorHandle, "
    "AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, double, AtenTensorHandle*)",
    "qqq_cpu::kron_transform": "AOTITorchError aoti_torch_cpu_kron_transform(AtenTensorHandle, AtenTensorHandle, "
    "const int64_t*, int64_t, AtenTensorHandle*)",
    "qqq_cpu::attention_mask": "AOTITorchError aoti_torch_cpu_attention_mask(AtenTensorHandle, AtenTensorHandle, "
    "AtenTensorHandle*)",
}


def aoti_c_shims() -> dict[Any, list[str]]:
    """``aot_inductor.custom_ops_to_c_shims`` for a package that calls the loaded extension's C
    shims (empty when the extension is not loaded, or its symbols could not be made global:
    the package then uses the proxy executor)."""
    if loaded_extension() is None or not _ext_state.get("global"):
        return {}
    out: dict[Any, list[str]] = {}
    for name, decl in AOTI_SHIMS.items():
        ns, op = name.split("::")
        out[getattr(getattr(torch.ops, ns), op).default] = [decl]
    return out


def loaded_extension() -> Any:
    """``torch.ops.qqq_cpu`` if this process has loaded the extension, else None; never
    builds or loads it (for process-level helpers that are only worth it beside the kernels)."""
    return _ext_state.get("mod")


# Freed CPU tensors (of 256 KB or more) that generation may keep for reuse
# (csrc/alloc_cpu.cpp).
REUSE_BYTES = 128 << 20
# ... and calibration (the block runner), at most: a GPTQ block frees tensors of a dozen sizes
# (fp32, bf16 and int8 activations of each width, Hessian chunks), 10-30 MB each at SmolLM2's
# batches. Two SmolLM2 GPTQ blocks, 128 windows: 308 k page faults and 2.8 s of system time
# with 128 MB kept, 270 k with 256 MB, 124 k and 2.1 s with 512 MB. See calib_reuse_bytes.
CALIB_REUSE_BYTES = 512 << 20


def calib_reuse_bytes(limit: int | None = None) -> int:
    """How many bytes of freed tensors calibration keeps: :data:`CALIB_REUSE_BYTES`, but at most
    a sixteenth of the memory this process may use (``limit``; default :func:`memory_limit`).
    Why the bound: a TinyLlama-1.1B-shaped model under a 3 GiB cgroup peaked at 2.81 GiB with
    512 MB kept against 2.43 GiB with 128 MB, in the same time (its tensors of 60-180 MB
    make page faults a smaller share of the work)."""
    limit = memory_limit() if limit is None else limit
    return min(CALIB_REUSE_BYTES, limit // 16) if limit else CALIB_REUSE_BYTES


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory this process may use: the lowest cgroup limit on its path (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``) or the machine's RAM, whichever is less; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and not controllers:
            base, name = Path(root), "memory.max"  # v2: one unified hierarchy
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the leaf and every parent
            try:
                text = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():  # v2 writes "max" when unlimited; v1 a huge number
                limits.append(int(text))
    return min(limits) if limits else None


class AllocationReuse:
    """While started, freed CPU tensors of 256 KB or more are kept (up to ``cap`` bytes) and
    handed back whole to the next request they fit, at most 1.5x its size (the C++
    extension's allocator, csrc/alloc_cpu.cpp). Calibration frees and requests the same few
    sizes thousands of times per block, a prefill the same few per layer: glibc either maps
    each afresh (page faults: the CLI's setting, or a large prefill chunk) or keeps them in a
    heap that fragments (a higher peak). Nothing happens without the extension loaded, or
    when another scope already installed it (that scope owns it); ``cap=0`` disables it.
    As a context manager: started on entry, stopped on exit.
    """

    def __init__(self, cap: int | None = None):
        self.cap = REUSE_BYTES if cap is None else cap
        self._ext: Any = None  # the extension's ops while this scope owns the allocator

    @classmethod
    def for_device(cls, device: torch.device) -> AllocationReuse:
        """A scope for work on ``device``: the default cap on the CPU, disabled elsewhere."""
        return cls(None if torch.device(device).type == "cpu" else 0)

    def __enter__(self) -> AllocationReuse:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def owner(self) -> bool:
        return self._ext is not None

    def start(self) -> bool:
        """Install the allocator if possible (cheap to call again); True while this owns it."""
        if self.owner or self.cap <= 0:
            return self.owner
        ext = loaded_extension()
        installed = 0  # alloc_cache_stats()[0]: whether the reusing allocator is in place
        if ext is not None and not ext.alloc_cache_stats()[installed] and ext.set_alloc_cache(self.cap):
            self._ext = ext
        return self.owner

    def stop(self) -> None:
        """Restore torch's allocator and unmap the kept blocks (tensors in use stay valid)."""
        if self._ext is not None:
            self._ext.set_alloc_cache(0)
            self._ext = None


def extension_available() -> bool:
    """Same as :func:`ensure_cpp_kernels` (the older name)."""
    return ensure_cpp_kernels()


def cpp_call_counts() -> dict[str, int]:
    """How many times each C++ op ran in this process (all zero if the extension is not loaded).

    Counts every entry into a C++ kernel: from the dispatcher (eager calls, ``torch.compile``,
    AOTInductor packages) or directly. Tests use it to prove which implementation ran.
    """
    ext = _ext_state.get("mod")
    counts = ext.call_counts() if ext is not None else [0] * len(OP_NAMES)
    return dict(zip(OP_NAMES, (int(c) for c in counts), strict=True))


def cpp_path_counts() -> dict[str, int]:
    """How many times each C++ kernel path ran in this process (:data:`PATH_NAMES`; all zero
    if the extension is not loaded). Tests use it to prove that, e.g., one token took the
    packed GEMV rather than unpack + ``torch._int_mm``."""
    ext = _ext_state.get("mod")
    counts = ext.path_counts() if ext is not None else [0] * len(PATH_NAMES)
    return dict(zip(PATH_NAMES, (int(c) for c in counts), strict=True))


def cpu_kernel_source(op: str) -> str:
    """Which implementation ``qqq::<op>`` runs for CPU tensors right now: ``"cpp"`` (the
    extension's dispatcher registration), ``"torch"`` (the pure-torch reference) or ``"none"``."""
    dump = torch._C._dispatch_dump(f"qqq::{op}")
    if re.search(r"^CPU: registered at .*ops_cpu\.cpp", dump, re.M):
        return "cpp"
    if re.search(r"^CompositeExplicitAutograd(\[alias\])?: registered", dump, re.M):
        return "torch"
    return "none"


# ---------------------------------------------------------------------------- torch reference


def int8_weight(qweight: torch.Tensor, group_scale: torch.Tensor | None, group_size: int, k: int) -> torch.Tensor:
    """``W8`` int8 ``[N, K]`` from the packed tensors (``PackedW4.int8_weight``)."""
    scale = torch.ones(qweight.shape[0])
    return PackedW4(qweight, scale, group_scale, k, group_size if group_scale is not None else -1).int8_weight()


def _int_mm(a: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ w8.T``; ``torch._int_mm`` returns garbage on CPU when K == 1."""
    if a.shape[1] == 1:
        return a.int() * w8.int().t()
    return torch._int_mm(a, w8.t())


def _epilogue(acc: torch.Tensor, xscale: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype):
    y = acc.float() * xscale.reshape(-1, 1).float() * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def quantize_act_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 (:func:`qqq_compile.targets.w4a8.formats.quantize_act_per_token`)."""
    return quantize_act_per_token(x)


def rmsnorm_quant_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 RMSNorm then per-token int8, in torch."""
    from qqq_compile.targets.w4a8.kernels.act_quant import rmsnorm_quant_ref

    return rmsnorm_quant_ref(x, weight, eps)


def w4a8_linear_q_torch(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(xq @ W8.T) * xscale * channel_scale + bias`` for int8 ``xq [..., K]``, in torch."""
    k = xq.shape[-1]
    w8 = int8_weight(qweight, group_scale, group_size, k)
    acc = _int_mm(xq.reshape(-1, k).contiguous(), w8)
    y = _epilogue(acc, xscale, channel_scale, bias, out_dtype)
    return y.reshape(*xq.shape[:-1], qweight.shape[0])


def w4a8_linear_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """W4A8 linear on float ``x [..., K]`` in torch; output in x's dtype."""
    q, s = quantize_act_per_token(x)
    return w4a8_linear_q_torch(q, s, qweight, channel_scale, group_scale, bias, group_size, x.dtype)


def w8a8_linear_torch(
    x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 linear on float ``x [..., K]`` (int8 ``w8 [N, K]``, fp32 ``scale [N]``) in torch."""
    k = x.shape[-1]
    q, s = quantize_act_per_token(x.reshape(-1, k))
    y = _epilogue(_int_mm(q, w8), s, scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w8.shape[0])
