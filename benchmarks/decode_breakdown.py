"""Where one decode step of the compiled W4A8 SmolLM2 spends its time, next to the floor.

    python benchmarks/decode_breakdown.py [--artifact DIR] [--no-int8-head] [--context 512] [--threads 2]

Times, in one run and alternating (round-robin) so load hits every row alike:
  * the whole AOTInductor decode step (one token at ``--context`` past tokens);
  * every W4A8 linear of the graph called alone at M=1 (the C++ kernels);
  * the lm_head alone (fp32 ``F.linear`` or ``qqq::w8a8_linear``);
  * SDPA alone, once per layer, at the step's shapes;
  * the rest (fused elementwise C++ + wrapper) = step - the three above.
The floor is the bytes a decode step must read (linears, lm_head, KV cache) divided by the
memory read bandwidth measured in the same run (torch ``sum`` over 1 GiB).
Weights of the demo model come from a GGUF Q4_1 file (already on a 4-bit grid).
"""

from __future__ import annotations

import argparse
import functools
import json
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
    """Callables for each W4A8 linear, the lm_head and each SDPA at the decode shapes."""

    def get(n):
        return functools.reduce(getattr, n.target.split("."), gm) if getattr(n, "op", None) == "get_attr" else n

    linears, head, sdpas, read = [], None, [], 0
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
        elif n.target is aten.scaled_dot_product_attention.default:
            q = n.args[0].meta["val"]
            h, d = int(q.shape[1]), int(q.shape[3])
            hkv = int(spec.layers[len(sdpas)]["kv_heads"])
            qq, kk, vv = torch.randn(1, h, 1, d), torch.randn(1, hkv, ctx, d), torch.randn(1, hkv, ctx, d)
            m = torch.ones(1, 1, 1, ctx, dtype=torch.bool)
            gqa = h != hkv
            sdpas.append(
                lambda qq=qq, kk=kk, vv=vv, m=m, gqa=gqa: F.scaled_dot_product_attention(
                    qq, kk, vv, attn_mask=m, enable_gqa=gqa
                )
            )
            read += 2 * hkv * ctx * d * 4
    return linears, head, sdpas, read


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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=1024, help="KV cache positions of the compiled step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="benchmarks/results/decode_breakdown.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    compiled = build(args)
    step = compiled.prepare_generation(max_batch=1, max_len=args.max_len, runtime="aot")
    ctx = args.context
    ids = torch.randint(0, 1000, (1, ctx))
    step(ids, torch.ones(1, ctx, dtype=torch.long), torch.arange(ctx))
    one, mask, pos = ids[:, :1], torch.ones(1, ctx + 1, dtype=torch.long), torch.tensor([ctx])
    linears, head, sdpas, read = parts(step.graph_module, step.spec, ctx)
    rows = {"step": [], "w4a8 linears": [], "lm_head": [], "sdpa": []}
    with torch.no_grad():
        for _ in range(args.rounds):  # round-robin: every row once per round
            rows["step"].append(median_ms(lambda: step(one, mask, pos), 20))
            rows["w4a8 linears"].append(median_ms(lambda: [f() for f in linears], 20))
            rows["lm_head"].append(median_ms(head, 20) if head else 0.0)
            rows["sdpa"].append(median_ms(lambda: [f() for f in sdpas], 20))
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["rest (fused elementwise + wrapper)"] = med["step"] - med["w4a8 linears"] - med["lm_head"] - med["sdpa"]
    bw = bandwidth_gbs()
    floor_ms = read / 1e9 / bw * 1e3
    print(
        f"threads {args.threads}, context {ctx}, {len(linears)} W4A8 linears, lm_head "
        f"{'int8' if args.int8_head else 'fp32'}; load average {os.getloadavg()[0]:.2f}"
    )
    print("| part | ms per token | share of step |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / med['step']:.0%} |")
    print(
        f"floor: {read / 1e6:.1f} MB read per token / {bw:.1f} GB/s = {floor_ms:.2f} ms "
        f"({1e3 / floor_ms:.0f} tokens/s); step {med['step']:.2f} ms = {1e3 / med['step']:.0f} tokens/s"
    )
    out = {
        "threads": args.threads,
        "context": ctx,
        "int8_head": args.int8_head,
        "ms": med,
        "bytes_per_token": read,
        "bandwidth_gbs": bw,
        "floor_ms": floor_ms,
        "load_average": os.getloadavg()[0],
    }
    tmp = args.json + ".tmp"
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
