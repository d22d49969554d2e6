"""CPU speed: W4A8 linears and the compiled SmolLM2 end to end, with ratios measured in the same run.

    python benchmarks/cpu_speed.py            # everything (linear table + end to end)
    python benchmarks/cpu_speed.py --e2e-only

End to end: the HF fp32 model vs the compiled W4A8 model (RTN weights: the method that
chose the weights does not change the speed), 512-token prefill tokens/s and
single-token (M = 1) forward latency, plus resident weight memory. If the ONNX exporter
is available, onnxruntime runs the exported model too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each ``fn``, timed round-robin.

    One prefill takes about a second, so timing each model in its own block gives one or
    two samples each, taken minutes apart: any drift of a shared machine (another
    process, page-cache pressure) then lands on one model only. Round-robin spreads it
    over all of them, so the ratios stay honest.
    """
    for fn in fns.values():
        fn()  # warm-up (and first-use compilation of the CPU extension)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def state_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def end_to_end(args: argparse.Namespace) -> dict:
    import qqq_compile as qc
    from qqq_compile.models import load_model
    from qqq_compile.targets.w4a8.fuse_norm_quant import FuseNormQuant

    model, tok = load_model("demo")
    calib = [
        torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    # The rows measured before the int8 lm_head became the default keep their float head, so
    # their figures stay comparable across runs; the default is its own row.
    fp_head = qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(int8_head=False))
    compiled = qc.compile(model, calib=calib, config=fp_head, progress=False)
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=g)
    one = prefill[:, :1].contiguous()
    compiled_fused = qc.compile(
        model,
        calib=calib,
        config=fp_head,
        progress=False,
        passes=[*qc.get_preset("rtn"), FuseNormQuant()],
    )
    # QuantConfig.float_weight_dtype: lm_head + the embedding tied to it stored in bf16.
    compiled_bf16 = qc.compile(
        model,
        calib=calib,
        config=qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(float_weight_dtype="bfloat16", int8_head=False)),
        progress=False,
    )
    compiled_int8 = qc.compile(model, calib=calib, config=qc.CompileConfig(preset="rtn"), progress=False)
    variants = {
        # no KV cache: the compiled model does not build one either
        "HF fp32": lambda x: model(input_ids=x, use_cache=False),
        "qqq W4A8": compiled,
        "qqq W4A8 + fused norm-quant": compiled_fused,
        "qqq W4A8 + bf16 lm_head/embedding": compiled_bf16,
        "qqq W4A8 + int8 lm_head/embedding (the default)": compiled_int8,
    }
    compiled_models = {k: v for k, v in variants.items() if k != "HF fp32"}
    with tempfile.TemporaryDirectory() as d:
        try:  # optional row, timed in the same rounds as the others
            from qqq_compile.targets.w4a8.export.onnx import export_onnx, ort_session, run_onnx

            sess = ort_session(export_onnx(compiled, Path(d) / "model.onnx"), args.threads)
            variants["onnxruntime (our ONNX export)"] = lambda x: run_onnx(sess, x)
        except Exception as e:  # noqa: BLE001
            print(f"(onnxruntime row skipped: {type(e).__name__}: {e})", file=sys.stderr)
        with torch.inference_mode():
            t_pre = interleaved({k: (lambda fn=fn: fn(prefill)) for k, fn in variants.items()}, args.rounds)
            t_one = interleaved({k: (lambda fn=fn: fn(one)) for k, fn in variants.items()}, 10 * args.rounds)
    rows = {k: {"prefill_tok_s": args.seq_len / t_pre[k], "m1_ms": t_one[k] * 1e3} for k in variants}
    rows["HF fp32"]["weights_mb"] = state_bytes(model) / 2**20
    for name, cm in compiled_models.items():
        rows[name]["weights_mb"] = cm.weight_bytes() / 2**20
    lin = compiled.linears()
    rows["qqq W4A8"]["linear_weights_mb"] = sum(li.packed.nbytes() for li in lin if li.lowered) / 2**20
    rows["HF fp32"]["linear_weights_mb"] = sum(li.in_features * li.out_features * 4 for li in lin if li.lowered) / 2**20
    return rows


def print_e2e(rows: dict, seq_len: int) -> None:
    base = rows["HF fp32"]
    print(f"\n## End to end, SmolLM2-135M, {torch.get_num_threads()} threads\n")
    print(f"| model | prefill {seq_len} tok/s | vs fp32 | M=1 forward ms | vs fp32 | weights MiB | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        w = r.get("weights_mb")
        wr = f"{w:.1f} | {w / base['weights_mb']:.2f}x" if w else "- | -"
        print(
            f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x "
            f"| {r['m1_ms']:.2f} | {base['m1_ms'] / r['m1_ms']:.2f}x | {wr} |"
        )
    q = rows["qqq W4A8"]
    print(
        f"\nLinear-layer weights only: {q['linear_weights_mb']:.1f} MiB packed vs "
        f"{base['linear_weights_mb']:.1f} MiB fp32 ({q['linear_weights_mb'] / base['linear_weights_mb']:.3f}x). "
        "Whole-model figures include the embedding/lm_head (tied): int8 W8A8 by default "
        "(QuantConfig.int8_head), fp32 in the rows without it, bf16 with "
        "QuantConfig(float_weight_dtype='bfloat16', int8_head=False)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--rounds", type=int, default=7, help="end to end: prefill rounds (M=1: 10x as many), all models per round"
    )
    ap.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the end-to-end rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.e2e_only:
        env = dict(os.environ)
        subprocess.run(
            [sys.executable, str(HERE / "cpu_linear.py"), "--threads", str(args.threads)], check=True, env=env
        )
    rows = end_to_end(args)
    print_e2e(rows, args.seq_len)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
