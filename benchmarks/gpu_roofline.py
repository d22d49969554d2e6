"""Roofline predictions for the W4A8 GEMM against an fp16 GEMM on A100 and H100.

    python benchmarks/gpu_roofline.py [--m 1 16 256] [--plot roofline.png]

For each weight format and layer shape (K in_features x N out_features) and M tokens:

* bytes moved by the W4A8 GEMM: int4 weights (N*K/2) + per-channel fp32 scales (4N) +
  group scales (N*ceil(K/128), 1 B int8 or 2 B fp16) + int8 activations (M*K) with fp32
  per-token scales (4M) + fp16 outputs (2MN);
* bytes moved by the fp16 GEMM: fp16 weights (2NK) + fp16 activations (2MK) + outputs (2MN);
* int8 MACs = M*N*K (the same count in fp16 for the baseline);
* predicted time = max(bytes / bandwidth, 2*MACs / peak), each at the published peak.

Published dense peaks: A100-80GB SXM 2039 GB/s, 624 int8 TOPS, 312 fp16 TFLOPS; H100 SXM
3350 GB/s, 1979 int8 TOPS, 989 fp16 TFLOPS. A roofline ignores the in-kernel dequant work
(the fp16 group variant rounds in float per weight), launch overhead and achievable
fractions of peak; it is an upper bound on the speedup, and the QQQ paper's measured
small-batch figures (3.67x per-channel, 3.29x per-group) are printed beside it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes / s
    int8_ops: float  # dense int8 ops / s (2 per MAC)
    fp16_flops: float  # dense fp16 flops / s


GPUS = (
    Gpu("A100-80GB SXM", 2039e9, 624e12, 312e12),
    Gpu("H100 SXM", 3350e9, 1979e12, 989e12),
)
# (K, N): SmolLM2-135M q/o (576x576), k/v (576x192), gate/up (576x1536), down (1536x576);
# LLaMA-7B attention (4096x4096) and MLP up (4096x11008).
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008))
MS = tuple(2**i for i in range(11))  # 1 .. 1024
GROUP = 128
# format -> bytes per group scale (0: per-channel, no group scales)
FORMATS = {"per_channel": 0, "group_int8": 1, "group_fp16": 2}
PAPER_SPEEDUP = {"per_channel": 3.67, "group_int8": 3.29, "group_fp16": 3.29}


def w4a8_bytes(m: int, k: int, n: int, fmt: str) -> int:
    weights = n * math.ceil(k / 2) + 4 * n + n * math.ceil(k / GROUP) * FORMATS[fmt]
    return weights + m * k + 4 * m + 2 * m * n


def fp16_bytes(m: int, k: int, n: int) -> int:
    return 2 * n * k + 2 * m * k + 2 * m * n


def predict(gpu: Gpu, m: int, k: int, n: int, fmt: str) -> dict:
    """Predicted seconds for the fp16 and W4A8 GEMMs, which bound each, and the speedup."""
    macs = m * n * k
    t16_mem, t16_math = fp16_bytes(m, k, n) / gpu.bandwidth, 2 * macs / gpu.fp16_flops
    t8_mem, t8_math = w4a8_bytes(m, k, n, fmt) / gpu.bandwidth, 2 * macs / gpu.int8_ops
    t16, t8 = max(t16_mem, t16_math), max(t8_mem, t8_math)
    return {
        "fp16_s": t16,
        "w4a8_s": t8,
        "bound": "mem" if t8_mem >= t8_math else "math",
        "speedup": t16 / t8,
        "bytes": w4a8_bytes(m, k, n, fmt),
        "macs": macs,
    }


def print_tables(ms: tuple[int, ...]) -> None:
    for gpu in GPUS:
        print(f"\n== {gpu.name}: predicted microseconds (W4A8 bound) and speedup over fp16 ==")
        head = f"{'K':>5} {'N':>6} {'M':>5} {'MB':>7} {'GMAC':>7} {'fp16':>8}"
        for fmt in FORMATS:
            head += f" | {fmt:>22}"
        print(head)
        for k, n in SHAPES:
            for m in ms:
                base = predict(gpu, m, k, n, "per_channel")
                row = f"{k:>5} {n:>6} {m:>5} {base['bytes'] / 1e6:>7.2f} {base['macs'] / 1e9:>7.3f} "
                row += f"{base['fp16_s'] * 1e6:>8.2f}"
                for fmt in FORMATS:
                    p = predict(gpu, m, k, n, fmt)
                    row += f" | {p['w4a8_s'] * 1e6:>7.2f} {p['bound']:>4} {p['speedup']:>6.2f}x  "
                print(row)


def print_summary() -> None:
    print("\n== small batch (M = 1..16): predicted speedup range vs the QQQ paper's measurement ==")
    for gpu in GPUS:
        for fmt in FORMATS:
            sp = [predict(gpu, m, k, n, fmt)["speedup"] for k, n in SHAPES for m in (1, 2, 4, 8, 16)]
            print(
                f"{gpu.name:<14} {fmt:<12} predicted {min(sp):.2f}x .. {max(sp):.2f}x   "
                f"QQQ paper (GEMM kernel, small batch): {PAPER_SPEEDUP[fmt]:.2f}x"
            )
    print(
        "At large M the layers turn compute bound and the bound falls to the int8 / fp16 peak ratio (2.0x);\n"
        "small layers stay memory bound on activations and outputs, which W4 does not shrink, and fall below it."
    )


def plot(path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(GPUS), figsize=(6 * len(GPUS), 4.5), sharey=True)
    for ax, gpu in zip(axes, GPUS, strict=True):
        for i, (k, n) in enumerate(SHAPES):  # one colour per shape, one line style per format
            for fmt, style in (("per_channel", "-"), ("group_fp16", "--")):
                sp = [predict(gpu, m, k, n, fmt)["speedup"] for m in MS]
                ax.plot(MS, sp, style, color=f"C{i}", label=f"{k}x{n} {fmt}")
        for fmt, y in (("per-channel", 3.67), ("per-group", 3.29)):
            ax.axhline(y, color="gray", lw=0.8, ls=":")
            ax.text(MS[-1], y, f"QQQ {fmt} {y}x", ha="right", va="bottom", fontsize=7)
        ax.set(xscale="log", xlabel="M (tokens)", title=f"{gpu.name}: roofline speedup over fp16")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted speedup")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=list(MS), help="token counts to tabulate")
    ap.add_argument("--plot", metavar="PNG", help="also save a speedup-vs-M plot (needs matplotlib)")
    args = ap.parse_args(argv)
    print_tables(tuple(args.m))
    print_summary()
    if args.plot:
        plot(args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
