"""CPU latency of the W4A8 linear against fp32 / bf16 ``F.linear``, onnxruntime MatMulNBits
and torchao 8da4w (when importable).

    python benchmarks/cpu_linear.py [--threads 2] [--min-run-time 0.3] [--quick]
    python benchmarks/cpu_linear.py --compiled-only [--rounds 40]
    python benchmarks/cpu_linear.py --decode-shapes

Prints a markdown table (median ms; ratios are measured in the same run). Numbers on a
shared machine are indicative only.

The first table (skip the shape sweep with ``--compiled-only``) times a ``compile()``d module
holding one ``nn.Linear(4096, 4096)`` (preset rtn, per-channel) at M = 1 next to the raw
kernel call, the dispatcher op, MatMulNBits and fp32, all round-robin in one run, with the
kernels' stall back-off on and off (off: every call forks the OpenMP team and waits at its
join, the behaviour before csrc/parallel_cpu.cpp). The median is what a user sees; the 10th
percentile approximates the machine without co-tenants.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from qqq_compile.targets.w4a8.formats import PackedW4
from qqq_compile.targets.w4a8.kernels import cpu

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]
MS = [1, 16, 512]


STAT = "median"


def bench(fn: Callable[[], object], min_run_time: float) -> float:
    """Wall time in ms (torch.utils.benchmark after a warm-up call): the median of its
    measurement blocks, or the fastest block with ``--stat min`` (steadier on a busy machine)."""
    fn()
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return (t.median if STAT == "median" else min(t.times)) * 1e3


def ort_matmul_nbits(k: int, n: int, threads: int) -> Callable[[torch.Tensor], object] | None:
    """A one-node ONNX model: com.microsoft MatMulNBits, 4 bits, block 128, accuracy_level 4."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    block = 128
    nb = math.ceil(k / block)
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, size=(n, nb, block // 2), dtype=np.uint8)
    scales = (rng.random(n * nb, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
        accuracy_level=4,
    )
    graph = helper.make_graph(
        [node],
        "mmnb",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[
            helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
            helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> object:
        return sess.run(None, {"A": x.numpy()})

    return run


def torchao_8da4w(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchao's int8-dynamic-activation int4-weight linear (group 128), if torchao is installed."""
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    group = 128 if w.shape[1] % 128 == 0 else 64
    try:
        quantize_(
            lin, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group))
        )
    except Exception as e:  # API drift across torchao versions
        warnings.warn(f"torchao 8da4w unavailable: {e}", stacklevel=2)
        return None
    return lin


def compiled_single_linear(threads: int, rounds: int, calls: int = 25, size: int = 4096) -> None:
    """M = 1 latency of a compiled one-linear module next to its kernel and the baselines,
    round-robin (each round: ``calls`` consecutive calls of each candidate)."""
    import qqq_compile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)).eval()
    cm = qqq_compile.compile(model, [torch.randn(1, 8, size)], config={"preset": "rtn"}, progress=False)
    gm = cm.graph_module
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    qw, cs = (getattr(gm, a.target) for a in node.args[1:3])
    x = torch.randn(1, size)
    w = model[0].weight.detach()
    cpu.ensure_cpp_kernels()
    ext = getattr(torch.ops, "qqq_cpu", None)
    has_backoff = ext is not None and hasattr(ext, "set_stall_backoff")
    ort_run = ort_matmul_nbits(size, size, threads)
    raw = partial(torch.ops.qqq_cpu.w4a8_linear, x, qw, cs, None, None, -1) if ext is not None else None
    fns: dict[str, Callable[[], object] | None] = {
        "compiled module `cm(x)`": partial(cm, x),
        "graph module `gm(**inputs)`": lambda: gm(**{cm.input_names[0]: x}),
        "dispatcher op `qqq.w4a8_linear`": partial(torch.ops.qqq.w4a8_linear, x, qw, cs, None, None, -1),
        "raw kernel `qqq_cpu.w4a8_linear`": raw,
        "raw kernel, stall back-off off": raw if has_backoff else None,
        "ORT MatMulNBits": partial(ort_run, x) if ort_run else None,
        "fp32 `F.linear`": partial(F.linear, x, w),
    }
    fns = {k: f for k, f in fns.items() if f is not None}
    times: dict[str, list[float]] = {k: [] for k in fns}
    stats = cpu.cpp_path_counts()
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                off = "back-off off" in k
                if off:
                    ext.set_stall_backoff(False)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
                if off:
                    ext.set_stall_backoff(True)
    paths = {k: v - stats[k] for k, v in cpu.cpp_path_counts().items() if v != stats[k]}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    p10 = {k: sorted(v)[len(v) // 10] * 1e3 for k, v in times.items()}
    base = med.get("ORT MatMulNBits", float("nan"))
    base10 = p10.get("ORT MatMulNBits", float("nan"))
    print(
        f"Compiled Linear({size}, {size}) at M=1, preset rtn (per-channel), threads={threads}, "
        f"{rounds} rounds x {calls} calls round-robin\n"
    )
    print("| candidate | median ms | / ORT | p10 ms | / ORT (p10) |")
    print("|---|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k]:.3f} | {med[k] / base:.2f} | {p10[k]:.3f} | {p10[k] / base10:.2f} |")
    print(f"\nkernel paths taken: {paths}\n", flush=True)


# SmolLM2-135M's decode GEMVs after fuse_linears (per-channel W4A8) and its int8 lm_head:
# (name, K, N, calls per token).
DECODE_SHAPES = [
    ("q/k/v fused", 576, 960, 30),
    ("o_proj", 576, 576, 30),
    ("gate/up fused", 576, 3072, 30),
    ("down_proj", 1536, 576, 30),
    ("lm_head (int8 W8A8)", 576, 49152, 1),
]


def decode_shapes(threads: int, rounds: int) -> None:
    """M = 1 time and achieved read bandwidth of each SmolLM2 decode GEMV, with its weights
    cycled through enough copies (>= 96 MB) that they come from memory, as in a decode step
    (~100 MB per token, three times the 32 MB L3), next to the machine's read bandwidth."""
    from qqq_compile.targets.w4a8.formats import quantize_int8_per_row

    x_big = torch.ones(256 * 1024 * 1024)  # 1 GiB
    x_big.sum()
    t_sum = min(bench(x_big.sum, 0.5) for _ in range(3))
    bw = x_big.numel() * 4 / t_sum / 1e6  # GB/s (t in ms)
    del x_big
    print(f"\nSmolLM2 decode GEMVs at M=1, per-channel W4A8 / int8 head, threads={threads}, weights cycled from memory")
    print(f"read bandwidth (torch sum over 1 GiB, same run): {bw:.1f} GB/s\n")
    print("| GEMV | K x N | bytes | ms per call | GB/s | of bandwidth | calls/token | ms/token |")
    print("|---|---|---|---|---|---|---|---|")
    total_ms = total_bytes = 0.0
    for name, k, n, calls in DECODE_SHAPES:
        if "int8" in name:
            w8, scale = quantize_int8_per_row(torch.randn(n, k))
            one = w8.numel() + scale.numel() * 4
            copies = [(w8.clone(), scale.clone()) for _ in range(max(2, math.ceil(96e6 / one)))]
            fns = [partial(torch.ops.qqq.w8a8_linear, torch.randn(1, k), w, s_) for w, s_ in copies]
        else:
            p = PackedW4.from_float(torch.randn(n, k), -1)
            one = p.qweight.numel() + p.channel_scale.numel() * 4
            copies = [(p.qweight.clone(), p.channel_scale.clone()) for _ in range(max(2, math.ceil(96e6 / one)))]
            fns = [partial(torch.ops.qqq.w4a8_linear, torch.randn(1, k), q, c, None, None, -1) for q, c in copies]
        it = iter(range(10**12))
        cycle = lambda fns=fns, it=it: fns[next(it) % len(fns)]()  # noqa: E731
        t = min(bench(cycle, 0.3) for _ in range(rounds))
        total_ms += t * calls
        total_bytes += one * calls
        print(
            f"| {name} | {k}x{n} | {one / 1e6:.2f} MB | {t:.4f} | {one / t / 1e6:.1f} | "
            f"{one / t / 1e6 / bw:.0%} | {calls} | {t * calls:.3f} |",
            flush=True,
        )
    print(
        f"| all | | {total_bytes / 1e6:.1f} MB/token | | {total_bytes / total_ms / 1e6:.1f} | "
        f"{total_bytes / total_ms / 1e6 / bw:.0%} | | {total_ms:.3f} |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    ap.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    ap.add_argument("--group-scale-dtype", default="int8", choices=["int8", "float16"])
    ap.add_argument(
        "--with-fallback",
        action="store_true",
        help="also time the pure-torch path (unpack int4 every call + torch._int_mm)",
    )
    ap.add_argument("--stat", default="median", choices=["median", "min"])
    ap.add_argument("--rounds", type=int, default=40, help="round-robin rounds of the compiled-linear table")
    ap.add_argument("--compiled-only", action="store_true", help="only the compiled single-linear table")
    ap.add_argument("--decode-shapes", action="store_true", help="only the SmolLM2 decode GEMV bandwidth table")
    args = ap.parse_args()
    global STAT
    STAT = args.stat
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    use_ext = cpu.extension_available()  # build before timing anything
    if args.decode_shapes:
        decode_shapes(args.threads, 3)
        return
    compiled_single_linear(args.threads, args.rounds)
    if args.compiled_only:
        return
    shapes = SHAPES[:4] if args.quick else SHAPES
    print(
        f"threads={args.threads}  stat={args.stat}  W4A8 format: group_size={args.group_size} "
        f"group_scale={args.group_scale_dtype}  extension={'yes' if use_ext else 'no (torch fallback)'}\n"
    )
    header = "| K x N | M | W4A8 ms | fp32 ms | bf16 ms | ORT NBits ms | torchao ms | fp32/W4A8 | W4A8/ORT |"
    if args.with_fallback:
        header += " torch fallback ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for k, n in shapes:
        w = torch.randn(n, k) / math.sqrt(k)
        gs = args.group_size if args.group_size > 0 and args.group_size <= k else -1
        p = PackedW4.from_float(w, gs, args.group_scale_dtype)
        w_bf16 = w.to(torch.bfloat16)
        ort_run = ort_matmul_nbits(k, n, args.threads)
        ao = torchao_8da4w(w)
        for m in MS:
            x = torch.randn(m, k)
            x_bf16 = x.to(torch.bfloat16)
            mrt = args.min_run_time
            ours = partial(torch.ops.qqq.w4a8_linear, x, p.qweight, p.channel_scale, p.group_scale, None, gs)
            t_ours = bench(ours, mrt)
            t_fp32 = bench(partial(F.linear, x, w), mrt)
            t_bf16 = bench(partial(F.linear, x_bf16, w_bf16), mrt)
            t_ort = bench(partial(ort_run, x), mrt) if ort_run else float("nan")
            t_ao = bench(partial(ao, x), mrt) if ao else float("nan")
            extra = ""
            if args.with_fallback:
                torch_path = partial(cpu.w4a8_linear_torch, x, p.qweight, p.channel_scale, p.group_scale, None, gs)
                extra = f" {bench(torch_path, mrt):.3f} |"
            print(
                f"| {k}x{n} | {m} | {t_ours:.3f} | {t_fp32:.3f} | {t_bf16:.3f} | {t_ort:.3f} | "
                f"{t_ao:.3f} | {t_fp32 / t_ours:.2f} | {t_ours / t_ort:.2f} |{extra}",
                flush=True,
            )


if __name__ == "__main__":
    main()
