"""What bf16 prefill attention costs in accuracy and buys in speed, one command.

The KV-cache step computes a prompt's attention with bf16 dot products and fp32 sums
(``attention_prefill``'s ``bf16_dot``, on CPUs with AVX512-BF16) with either cache: the
default fp32 cache and a bf16 cache (``prepare_generation(cache_dtype=torch.bfloat16)``);
``add_kv_cache(..., bf16_attention=False)`` keeps exact fp32 products. On a saved artifact this
prints, for the KV-cache step's prefill over the standard evaluation windows (Wikipedia, BOS +
511 tokens, every position's logits, eager step graphs): perplexity and top-1 agreement with
exact attention, and the model's own forward (``CompiledModel.__call__``, a different
attention kernel in fp32) against the same reference, the agreement float rounding alone
gives. Then the prefill kernel's time per layer at the model's attention shape, fp32 against
bf16 dot products, alternating in one process (medians).

    python benchmarks/attention_precision.py --artifact /tmp/runs/s15 --windows 40
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def _logits(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[index]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="a saved qqq_compile artifact (qqq-compile quantize ...)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="kernel timing rounds (default 15)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qqq_compile.cli.common import load_artifact
    from qqq_compile.data import standard_splits
    from qqq_compile.runtime.kv_cache import add_kv_cache
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.ensure_cpp_kernels():
        raise SystemExit("the C++ kernels are unavailable on this CPU: both caches would run SDPA")
    bf16_cpu = "avx512_bf16" in cpu._cpu_flags()
    model, tokenizer = load_artifact(args.artifact, need_tokenizer=True)
    _, windows = standard_splits(tokenizer, n_calib=1, n_eval=args.windows)
    length = windows[0].shape[-1]
    steps = {
        name: add_kv_cache(
            model.graph_module, max_batch=1, max_len=length, last_logits_only=False, cache_dtype=dt, bf16_attention=bf
        )[0]
        for name, dt, bf in (
            ("exact (fp32 cache, fp32 products)", None, False),
            ("fp32 cache, bf16 prefill products (the default)", None, True),
            ("bf16 cache", torch.bfloat16, True),
        )
    }
    mask, pos = torch.ones(1, length, dtype=torch.long), torch.arange(length)
    rows: dict[str, tuple[float, list[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, run in [*steps.items(), ("model forward", None)]:
            nll, top = 0.0, []
            for w in windows:
                ids = w.reshape(1, -1)
                lg = (model(ids).logits if run is None else _logits(run(ids, mask, pos)))[0].float()
                nll -= torch.log_softmax(lg[:-1], -1).gather(1, ids[0, 1:, None]).sum().item()
                top.append(lg.argmax(-1))
            rows[name] = (math.exp(nll / (len(windows) * (length - 1))), top)
    ref_ppl, ref_top = rows["exact (fp32 cache, fp32 products)"]
    print(f"\n{args.artifact}: {len(windows)} windows of {length} tokens, prefill logits of every position")
    print("| attention | perplexity | vs exact | top-1 agreement with exact |")
    print("|---|---|---|---|")
    for name, (ppl, top) in rows.items():
        agree = torch.cat([(a == b).float() for a, b in zip(top, ref_top, strict=True)]).mean().item()
        print(f"| {name} | {ppl:.4f} | {(ppl / ref_ppl - 1) * 100:+.3f}% | {agree * 100:.2f}% |")

    # The prefill kernel alone at the model's attention shape (heads from the graph's cache).
    spec = add_kv_cache(model.graph_module, max_batch=1, max_len=length)[1].layers[0]
    hkv, d = spec["kv_heads"], spec["head_dim"]
    h = hkv * _query_heads_per_kv(model)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, length, d, generator=g) for n in (h, hkv, hkv))
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    op = torch.ops.qqq_cpu.attention_f32kv
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for bf in (False, True):
            t = time.perf_counter()
            op(q, k, v, causal, d**-0.5, bf)
            times[bf].append(time.perf_counter() - t)
    fp32, bf16 = (statistics.median(times[b]) * 1e3 for b in (False, True))
    print(f"\nprefill kernel, {h}/{hkv} heads x {d}, {length} causal tokens, {args.threads} threads:")
    print(f"fp32 products {fp32:.2f} ms per layer, bf16 dot products {bf16:.2f} ms ({fp32 / bf16:.2f}x)")
    if not bf16_cpu:
        print("(this CPU lacks AVX512-BF16: both calls ran the fp32 kernel)")


def _query_heads_per_kv(model: object) -> int:
    cfg = model.model_config  # type: ignore[attr-defined]
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    heads, kv = get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads")
    return int(heads) // int(kv)


if __name__ == "__main__":
    main()
