"""Decode cost of the W4A8 weight formats (per channel, g128, g64) at the widths real models have.

    python benchmarks/format_speed.py [--models smollm2,qwen2.5-0.5b,llama-3-8b] [--rounds 15] [--threads 2]

For each model shape, one decoder layer's projections at M = 1 (one token: decode), as the
decode step calls them (q/k/v fused into one GEMV, gate/up fused, then o and down), with
random weights packed by round to nearest in each format (speed does not depend on the
values). Every layer's weights are cycled through enough copies (>= 96 MB) that they come
from memory, as in a real decode step. Formats take turns, ``--rounds`` times
(round-robin: drift of a shared machine hits them alike); the median per layer is printed
with its ratio to the fastest format, the bits per weight (scales included) and the
bytes read per layer.

The default format's rule (``qqq_compile.config.DEFAULT_PRESET``'s comment): the most
accurate format (benchmarks/accuracy.py on SmolLM2) whose decode cost here is within 10 %
of the fastest at every width.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qqq_compile.targets.w4a8.formats import PackedW4  # noqa: E402
from qqq_compile.targets.w4a8.kernels import ensure_cpp_kernels  # noqa: E402

#: (hidden, q heads x head dim, kv heads x head dim, MLP width) of each model's layers.
MODELS = {
    "smollm2": (576, 576, 192, 1536),
    "qwen2.5-0.5b": (896, 896, 128, 4864),
    "qwen2.5-1.5b": (1536, 1536, 256, 8960),
    "llama-2-7b": (4096, 4096, 4096, 11008),
    "llama-3-8b": (4096, 4096, 1024, 14336),
    "qwen2.5-7b": (3584, 3584, 512, 18944),
}
FORMATS = {"per-channel": -1, "g128": 128, "g64": 64}


def layer_shapes(hidden: int, q: int, kv: int, mlp: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of a layer's decode GEMVs, fused as the step fuses them."""
    return [("qkv", hidden, q + 2 * kv), ("o", q, hidden), ("gate_up", hidden, 2 * mlp), ("down", mlp, hidden)]


def make_layer(shapes: list[tuple[str, int, int]], gs: int, copies_bytes: float = 96e6):
    """Callables running one layer's GEMVs in ``gs`` format, cycling over weight copies."""
    packs = [PackedW4.from_float(torch.randn(n, k), gs) for _, k, n in shapes]
    one = sum(p.nbytes() for p in packs)
    n_copies = max(2, math.ceil(copies_bytes / one))
    layers = []
    for _ in range(n_copies):
        calls = []
        for (_, k, _), p in zip(shapes, packs, strict=True):
            q, c = p.qweight.clone(), p.channel_scale.clone()
            g = None if p.group_scale is None else p.group_scale.clone()
            calls.append((torch.randn(1, k), q, c, g))
        layers.append(calls)
    bits = 8.0 * one / sum(k * n for _, k, n in shapes)
    return layers, one, bits


def time_layer(layers, gs: int, reps: int = 20) -> float:
    """Median ms of one layer's GEMVs over ``reps`` calls (each on the next copy)."""
    op, times = torch.ops.qqq.w4a8_linear, []
    for i in range(reps):
        calls = layers[i % len(layers)]
        t0 = time.perf_counter()
        for x, q, c, g in calls:  # the dispatcher op: the C++ kernel on CPU
            op(x, q, c, g, None, gs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b,qwen2.5-7b")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_cpp_kernels():
        raise SystemExit("the C++ W4A8 kernels are unavailable on this CPU: nothing to measure")
    print(f"W4A8 formats, one decoder layer's GEMVs at M=1, threads={args.threads}, {args.rounds} rounds round-robin\n")
    print("| model | K x N (layer) | format | bits/weight | MB/layer | ms/layer | vs fastest |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model '{name}'; known: {', '.join(MODELS)}")
        shapes = layer_shapes(*MODELS[name])
        built = {f: make_layer(shapes, gs) for f, gs in FORMATS.items()}
        for f, gs in FORMATS.items():
            time_layer(built[f][0], gs, reps=3)  # warm-up
        samples: dict[str, list[float]] = {f: [] for f in FORMATS}
        for _ in range(args.rounds):
            for f, gs in FORMATS.items():
                samples[f].append(time_layer(built[f][0], gs))
        med = {f: statistics.median(v) for f, v in samples.items()}
        fastest = min(med.values())
        dims = ", ".join(f"{k}x{n}" for _, k, n in shapes)
        for f in FORMATS:
            _, one, bits = built[f]
            print(
                f"| {name} | {dims} | {f} | {bits:.3f} | {one / 1e6:.2f} | {med[f]:.3f} | {med[f] / fastest:.2f}x |",
                flush=True,
            )
        del built


if __name__ == "__main__":
    main()
