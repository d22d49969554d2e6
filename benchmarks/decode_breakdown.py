"""Where one decode step of the compiled W4A8 SmolLM2 spends its time, next to the floor,
and what the decode levers change, all timed in one run.

    python benchmarks/decode_breakdown.py [--artifact DIR] [--no-int8-head] [--context 512]
        [--threads 2] [--cache-dtypes float32,bfloat16] [--accuracy-windows 4]

Times, round-robin (every row once per round, so load hits every row alike):
  * the whole AOTInductor decode step (one token at ``--context`` past tokens), once per KV
    cache dtype of ``--cache-dtypes`` (``bfloat16``: ``prepare_generation(cache_dtype=...)``,
    attention by ``qqq_cpu::attention_bf16kv``);
  * ``generate()`` per new token against the same steps driven by a bare loop (the loop's own
    cost: argmax, bookkeeping, the step call), over ``--new-tokens`` tokens from ``--context``;
  * every W4A8 linear of the graph called alone at M=1 (the C++ kernels; each call also pays
    the Python dispatcher, estimated by the ``call overhead`` row: the same count of calls of
    a 16x16 linear), the lm_head alone (fp32 ``F.linear`` or ``qqq::w8a8_linear``);
  * attention alone, once per layer, at the step's shapes: torch SDPA over the fp32 cache,
    over a bf16 cache, the bf16 kernel and the fp32 kernel (``qqq_cpu::attention_f32kv``, what
    the step runs over an fp32 cache);
  * the rest (fused elementwise C++ + wrapper) = step - linears - lm_head - attention.
The floor is the bytes a decode step must read (linears, lm_head, KV cache at ``--context``)
divided by the memory read bandwidth measured in the same run (torch ``sum`` over 1 GiB).

``--accuracy-windows N``: teacher-forced perplexity of each cached step over the first N
evaluation windows (BOS + 255 tokens: 128 prefilled, the rest decoded one token at a time)
and the SQNR of the decoded logits against the fp32-cache step. Weights of the demo model
come from a GGUF Q4_1 file (already on a 4-bit grid).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def bandwidth_gbs() -> float:
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    x.sum()
    return x.numel() * 4 / 1e9 / (median_ms(lambda: x.sum(), 5) / 1e3)


def build(args):
    import qqq_compile as qc
    from qqq_compile.data import standard_splits
    from qqq_compile.models import load_model

    if args.artifact:
        return qc.load(args.artifact)
    model, tok = load_model("demo")
    calib, _ = standard_splits(tok, n_calib=8, n_eval=1)
    config = qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(int8_head=args.int8_head))
    return qc.compile(model, calib=calib, config=config, progress=False)


def parts(gm: torch.fx.GraphModule, spec, ctx: int):
    """Callables for each W4A8 linear, the lm_head and each attention at the decode shapes."""

    def get(n):
        return functools.reduce(getattr, n.target.split("."), gm) if getattr(n, "op", None) == "get_attr" else n

    linears, head, attn, read = (
        [],
        None,
        {"sdpa fp32 cache": [], "fp32 kernel": [], "sdpa bf16 cache": [], "bf16 kernel": []},
        0,
    )
    sdpa_ops = (
        aten.scaled_dot_product_attention.default,
        torch.ops.qqq_cpu.attention_bf16kv.default,
        torch.ops.qqq_cpu.attention_f32kv.default,
    )
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is torch.ops.qqq.w4a8_linear.default:
            qw, cs, gs, b, g = (get(a) if hasattr(a, "op") else a for a in n.args[1:6])
            k = n.args[0].meta["val"].shape[-1]
            x = torch.randn(1, k)
            linears.append(lambda x=x, qw=qw, cs=cs, gs=gs, b=b, g=g: torch.ops.qqq.w4a8_linear(x, qw, cs, gs, b, g))
            read += sum(t.numel() * t.element_size() for t in (qw, cs, gs, b) if isinstance(t, torch.Tensor))
        elif n.target is torch.ops.qqq.w8a8_linear.default:
            w8, s = get(n.args[1]), get(n.args[2])
            x = torch.randn(1, w8.shape[1])
            head = lambda x=x, w8=w8, s=s: torch.ops.qqq.w8a8_linear(x, w8, s, None)  # noqa: E731
            read += w8.numel() + s.numel() * 4
        elif n.target is aten.linear.default and n.args[1].op == "get_attr":
            w = get(n.args[1])
            x = torch.randn(1, w.shape[1])
            head = lambda x=x, w=w: F.linear(x, w)  # noqa: E731
            read += w.numel() * w.element_size()
        elif n.target in sdpa_ops:
            layer = spec.layers[len(attn["bf16 kernel"])]
            h, d, hkv = int(n.args[0].meta["val"].shape[1]), int(layer["head_dim"]), int(layer["kv_heads"])
            qq, m = torch.randn(1, h, 1, d), torch.ones(1, 1, 1, ctx, dtype=torch.bool)
            k32, v32 = torch.randn(1, hkv, ctx, d), torch.randn(1, hkv, ctx, d)
            k16, v16, kt16 = k32.bfloat16(), v32.bfloat16(), k32.transpose(2, 3).contiguous().bfloat16()
            gqa = h != hkv
            attn["sdpa fp32 cache"].append(
                lambda q=qq, k=k32, v=v32, m=m, g=gqa: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=m, enable_gqa=g
                )
            )
            attn["fp32 kernel"].append(
                lambda q=qq, k=k32, v=v32, m=m, d=d: torch.ops.qqq_cpu.attention_f32kv(q, k, v, m, d**-0.5)
            )
            attn["sdpa bf16 cache"].append(
                lambda q=qq, k=k16, v=v16, m=m, g=gqa: F.scaled_dot_product_attention(
                    q.bfloat16(), k, v, attn_mask=m, enable_gqa=g
                ).float()
            )
            attn["bf16 kernel"].append(
                lambda q=qq, k=kt16, v=v16, m=m, d=d: torch.ops.qqq_cpu.attention_bf16kv(q, k, v, m, d**-0.5)
            )
    return linears, head, attn, read


def head_sliced(gm: torch.fx.GraphModule) -> bool:
    """Whether the lm_head reads the last position only (``last_logits_only`` in the step)."""
    for n in gm.graph.nodes:
        if n.target in (torch.ops.qqq.w8a8_linear.default, aten.linear.default) and n.args[1].op == "get_attr":
            src = n.args[0]
            return getattr(src, "target", None) is aten.slice.Tensor and src.args[2] == -1
    return False


def loop_rows(step, ctx: int, new: int) -> tuple[callable, callable]:
    """generate() over ``new`` tokens, and the same step calls in a bare loop (ms per token)."""
    from qqq_compile.runtime.generate import SamplingConfig, generate

    ids = torch.randint(0, 1000, (1, ctx), generator=torch.Generator().manual_seed(1))
    mask, pos = torch.ones(1, ctx + new, dtype=torch.long), torch.arange(ctx + new)
    nxt = torch.zeros(1, 1, dtype=torch.long)
    cfg = SamplingConfig(max_new_tokens=new)

    def gen() -> float:
        return 1e3 * generate(step, ids, None, cfg).decode_seconds / (new - 1)

    def bare() -> float:
        step(ids, mask[:, :ctx], pos[:ctx])
        t0 = time.perf_counter()
        for i in range(new - 1):
            step(nxt, mask[:, : ctx + i + 1], pos[ctx + i : ctx + i + 1])
        return 1e3 * (time.perf_counter() - t0) / (new - 1)

    return gen, bare


def accuracy(steps: dict[str, object], windows: list[torch.Tensor], prefill: int) -> dict[str, dict[str, float]]:
    """Teacher-forced perplexity of each step over ``windows`` and SQNR of its decoded logits
    against the first step's."""
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in steps}
    nll: dict[str, list[float]] = {name: [] for name in steps}
    with torch.no_grad():
        for w in windows:
            w = w.reshape(1, -1)
            t = w.shape[1]
            for name, step in steps.items():
                out = [step(w[:, :prefill], torch.ones(1, prefill, dtype=torch.long), torch.arange(prefill))]
                for p in range(prefill, t - 1):
                    out.append(step(w[:, p : p + 1], torch.ones(1, p + 1, dtype=torch.long), torch.tensor([p])))
                lg = torch.cat([o[:, -1:] for o in out], 1)[0].float()  # predictions of tokens prefill..t-1
                logits[name].append(lg)
                nll[name].append(F.cross_entropy(lg, w[0, prefill:], reduction="sum").item() / lg.shape[0])
    ref = next(iter(steps))
    out = {}
    for name in steps:
        a, b = torch.cat(logits[ref]), torch.cat(logits[name])
        sqnr = 10 * math.log10(a.pow(2).mean().item() / max((a - b).pow(2).mean().item(), 1e-30))
        out[name] = {"perplexity": math.exp(statistics.mean(nll[name])), "logits_sqnr_db_vs_" + ref: sqnr}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a saved artifact (default: RTN W4A8 SmolLM2 built here)")
    p.add_argument(
        "--int8-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8 lm_head and embedding (QuantConfig.int8_head; default: on; --no-int8-head: fp32 head)",
    )
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens of the generate() vs bare-loop rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=1024, help="KV cache positions of the compiled step")
    p.add_argument("--cache-dtypes", default="float32,bfloat16", help="KV cache dtypes to build a step for")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--accuracy-windows", type=int, default=0, help="teacher-forced perplexity over N windows")
    p.add_argument("--json", default="benchmarks/results/decode_breakdown.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    compiled = build(args)
    ctx = args.context
    if ctx + args.new_tokens > args.max_len:
        p.error("--context + --new-tokens must fit in --max-len")
    dtypes = [d.strip() for d in args.cache_dtypes.split(",") if d.strip()]
    steps = {}
    for d in dtypes:
        kw = {"cache_dtype": getattr(torch, d)} if d != "float32" else {}
        steps[d] = compiled.prepare_generation(max_batch=1, max_len=args.max_len, runtime="aot", **kw)
    ids = torch.randint(0, 1000, (1, ctx))
    for step in steps.values():
        step(ids, torch.ones(1, ctx, dtype=torch.long), torch.arange(ctx))
    one, mask, pos = ids[:, :1], torch.ones(1, ctx + 1, dtype=torch.long), torch.tensor([ctx])
    first = next(iter(steps.values()))
    linears, head, attn, weight_read = parts(first.graph_module, first.spec, ctx)
    tiny, tx = _tiny_packed(), torch.randn(1, 16)
    overhead = lambda: [
        torch.ops.qqq.w4a8_linear(tx, tiny.qweight, tiny.channel_scale, None, None, -1) for _ in linears
    ]  # noqa: E731
    gen, bare = loop_rows(first, ctx, args.new_tokens)  # the first cache dtype's step
    rows: dict[str, list[float]] = {f"step ({d} KV cache)": [] for d in steps}
    rows.update({"generate() per token": [], "bare step loop per token": []})
    rows.update({"w4a8 linears": [], "call overhead": [], "lm_head": []})
    rows.update({f"attention: {k}": [] for k in attn})
    with torch.no_grad():
        for _ in range(args.rounds):  # round-robin: every row once per round
            for d, step in steps.items():
                rows[f"step ({d} KV cache)"].append(median_ms(lambda s=step: s(one, mask, pos), 20))
            rows["generate() per token"].append(gen())
            rows["bare step loop per token"].append(bare())
            rows["w4a8 linears"].append(median_ms(lambda: [f() for f in linears], 20))
            rows["call overhead"].append(median_ms(overhead, 20))
            rows["lm_head"].append(median_ms(head, 20) if head else 0.0)
            for k, fns in attn.items():
                rows[f"attention: {k}"].append(median_ms(lambda fns=fns: [f() for f in fns], 20))
    med = {k: statistics.median(v) for k, v in rows.items()}
    attn_of = {"float32": "attention: fp32 kernel", "bfloat16": "attention: bf16 kernel"}
    for d in steps:
        a = med[attn_of.get(d, "attention: fp32 kernel")]
        med[f"rest ({d} cache: elementwise + wrapper)"] = (
            med[f"step ({d} KV cache)"] - med["w4a8 linears"] - med["lm_head"] - a
        )
    med["loop overhead (generate - bare loop)"] = med["generate() per token"] - med["bare step loop per token"]
    bw = bandwidth_gbs()
    kv_bytes = {d: ctx * s.spec.cache_bytes() / (s.spec.max_len * s.spec.max_batch) for d, s in steps.items()}
    print(
        f"threads {args.threads}, context {ctx}, {len(linears)} W4A8 linears, lm_head "
        f"{'int8' if args.int8_head else 'fp32'}, lm_head on the last position only: "
        f"{head_sliced(first.graph_module)}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    base = med[f"step ({next(iter(steps))} KV cache)"]
    print(f"| part | ms per token | vs step ({next(iter(steps))} cache) |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / base:.2f} |")
    floors = {}
    for d in steps:
        read = weight_read + kv_bytes[d]
        floors[d] = read / 1e9 / bw * 1e3
        print(
            f"floor ({d} cache): {weight_read / 1e6:.1f} MB weights + {kv_bytes[d] / 1e6:.1f} MB KV cache read per "
            f"token / {bw:.1f} GB/s = {floors[d]:.2f} ms ({1e3 / floors[d]:.0f} tokens/s); step "
            f"{med[f'step ({d} KV cache)']:.2f} ms = {floors[d] / med[f'step ({d} KV cache)']:.0%} of the floor's speed"
        )
    acc = None
    if args.accuracy_windows:
        from transformers import AutoTokenizer

        from qqq_compile.data import standard_splits
        from qqq_compile.models import demo_model_path

        tok = AutoTokenizer.from_pretrained(demo_model_path())
        _, windows = standard_splits(tok, seq_len=256, n_calib=8, n_eval=args.accuracy_windows)
        acc = accuracy(steps, windows, prefill=128)
        print(
            f"teacher-forced over {len(windows)} eval windows (BOS + 255 tokens, 128 prefilled, 127 decoded; "
            "weights from the Q4_1 GGUF):"
        )
        for d, r in acc.items():
            print(f"  {d} KV cache: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
    out = {
        "threads": args.threads,
        "context": ctx,
        "int8_head": args.int8_head,
        "ms": med,
        "weight_bytes_per_token": weight_read,
        "kv_cache_bytes_per_token": kv_bytes,
        "bandwidth_gbs": bw,
        "floor_ms": floors,
        "accuracy": acc,
        "load_average": os.getloadavg()[0],
    }
    tmp = args.json + ".tmp"
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)


def _tiny_packed():
    from qqq_compile.targets.w4a8.formats import PackedW4

    return PackedW4.from_float(torch.randn(16, 16), -1)


if __name__ == "__main__":
    main()
