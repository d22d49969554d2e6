"""Does the serving engine give every request what ``generate()`` gives it alone? One command.

Staggered greedy requests (real Wikipedia prompts) go through the batching engine behind
``qqq-compile serve`` (continuous batching: most of them join a running batch at later cache
slots, some prefilled together), and each request's tokens are compared with
``CompiledModel.generate()`` for that prompt alone. Prints how many are token-identical and
how they joined.

    python benchmarks/serve_equality.py                      # SmolLM2, RTN W4A8, compiled here
    python benchmarks/serve_equality.py --artifact /tmp/runs/s15 --runtime aot

SmolLM2's weights come from a GGUF Q4_1 file: they already sit on a 4-bit grid.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="a saved artifact (default: the demo model compiled with preset rtn)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8, help="rows of the engine's step")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--new", type=int, default=24, help="new tokens per request (greedy, no EOS)")
    ap.add_argument("--gap", type=float, default=0.15, help="seconds between arrivals")
    ap.add_argument("--runtime", choices=["eager", "aot"], default="eager")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import qqq_compile as qc
    from qqq_compile.data import standard_splits
    from qqq_compile.runtime.batching import BatchingEngine, Job, TextStream
    from qqq_compile.runtime.generate import SamplingConfig

    if args.artifact:
        from qqq_compile.cli.common import load_artifact

        compiled, tok = load_artifact(args.artifact, need_tokenizer=True)
        _, windows = standard_splits(tok, n_calib=1, n_eval=4)
    else:
        from qqq_compile.models import load_model

        model, tok = load_model("demo")
        calib, windows = standard_splits(tok, n_calib=8, n_eval=4)
        compiled = qc.compile(model, calib=calib, config=qc.CompileConfig(preset="rtn"), progress=False)
    text = torch.cat([w.reshape(-1) for w in windows]).tolist()
    stride = max(args.prompt, (len(text) - args.prompt) // args.requests)
    prompts = [text[1 + i * stride : 1 + i * stride + args.prompt] for i in range(args.requests)]

    step = compiled._build_step(args.rows, args.max_len, args.runtime, progress=False)
    engine = BatchingEngine(step).start()
    done = threading.Semaphore(0)
    jobs = []
    for p in prompts:
        job = Job(
            p,
            SamplingConfig(max_new_tokens=args.new, eos_token_id=[]),
            TextStream(lambda ids: " ".join(map(str, ids))),
            lambda ev: done.release() if ev.finish_reason else None,
        )
        jobs.append(job)
        engine.submit([job])
        time.sleep(args.gap)
    for _ in jobs:
        if not done.acquire(timeout=600):
            raise SystemExit("a request did not finish within 10 minutes")
    stats = engine.stats()
    engine.close()

    same, first_diff = 0, []
    for job, p in zip(jobs, prompts, strict=True):
        want = compiled.generate(torch.tensor([p]), max_new_tokens=args.new, eos_token_id=[], runtime=args.runtime)
        want = want[0, len(p) :].tolist()
        same += job.generated == want
        if job.generated != want:
            first_diff.append(next(i for i, (a, b) in enumerate(zip(job.generated, want, strict=True)) if a != b))
    print(
        f"{same} of {len(jobs)} requests token-identical to generate() alone "
        f"({args.runtime} step of {args.rows} rows x {args.max_len}; joined at later slots: "
        f"{stats.get('joined_shifted')}, at slot 0: {stats.get('joined_at_0')}, "
        f"prefill calls: {stats.get('prefill_calls')})"
    )
    if first_diff:
        print(f"first differing token index of the others: {sorted(first_diff)}")


if __name__ == "__main__":
    main()
