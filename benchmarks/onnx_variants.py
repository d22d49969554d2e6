"""Which ONNX encoding to export: onnxruntime speed and perplexity agreement, measured.

    python benchmarks/onnx_variants.py [--group-size 128] [--n-eval 8] [--threads 2]

SmolLM2-135M compiled with RTN W4A8 (the weight method does not change the encoding
question), exported four ways and run in onnxruntime on CPU:

* ``matmulnbits``: our per-token int8 step, then ``MatMulNBits`` (accuracy_level 4);
* ``matmulnbits_blockwise``: ``MatMulNBits`` alone (onnxruntime's block-wise int8);
* ``dq`` as onnxruntime runs it by default (it fuses DequantizeLinear+MatMul into
  ``MatMulNBits``, re-quantizing activations per block);
* ``dq`` with that fusion kept in float (``session.qdq_matmulnbits_accuracy_level=0``):
  the exact W4A8 arithmetic.

Prints, per variant, 512-token prefill tokens/s and M=1 latency (ratios against our own
compiled model, measured in the same run) and the perplexity on the last ``--n-eval``
Wikipedia windows against ours.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _session(path: Path, threads: int, **config: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _median_s(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import qqq_compile as qc
    from qqq_compile.data import standard_splits
    from qqq_compile.eval import perplexity
    from qqq_compile.models import load_model
    from qqq_compile.targets.w4a8.export.onnx import export_onnx, run_onnx

    model, tok = load_model("demo")
    calib, evals = standard_splits(tok, n_calib=8, n_eval=args.n_eval)
    config = {"preset": "rtn", "quant": {"group_size": args.group_size}}
    compiled = qc.compile(model, calib, config, progress=False)
    prefill = evals[0][:, :512]
    one = evals[0][:, :1].contiguous()

    def row(fn) -> dict:
        with torch.inference_mode():
            return {
                "prefill_tok_s": prefill.shape[1] / _median_s(lambda: fn(prefill), args.runs),
                "m1_ms": 1e3 * _median_s(lambda: fn(one), 4 * args.runs),
                "ppl": perplexity(fn, evals, batch_size=4, progress=False),
            }

    rows = {"qqq_compile (ours, reference)": row(lambda ids: compiled(ids).logits)}
    variants = [
        ("matmulnbits", "matmulnbits", {}),
        ("matmulnbits_blockwise", "matmulnbits_blockwise", {}),
        ("dq (onnxruntime default: fused, block-wise int8)", "dq", {}),
        ("dq, fusion in float (exact)", "dq", {"session.qdq_matmulnbits_accuracy_level": "0"}),
    ]
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for label, kind, cfg in variants:
            if kind not in paths:
                paths[kind] = export_onnx(compiled, Path(d) / f"{kind}.onnx", kind=kind)
            sess = _session(paths[kind], args.threads, **cfg)
            rows[label] = row(lambda ids, s=sess: run_onnx(s, ids))
            print(f"measured {label}", flush=True)

    ref = rows["qqq_compile (ours, reference)"]
    print(f"\n## ONNX encodings, SmolLM2-135M RTN W4A8 g{args.group_size}, {args.threads} threads\n")
    print(f"| variant | prefill 512 tok/s | vs ours | M=1 ms | vs ours | ppl ({args.n_eval} windows) | Δ vs ours |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x "
            f"| {r['m1_ms']:.1f} | {ref['m1_ms'] / r['m1_ms']:.2f}x | {r['ppl']:.3f} "
            f"| {100 * (r['ppl'] / ref['ppl'] - 1):+.2f}% |"
        )


if __name__ == "__main__":
    main()
