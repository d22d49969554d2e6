"""Shared by the peer runners (run in the peers' own venvs: no qqq_compile import).

The perplexity here is the same definition as ``qqq_compile.eval.perplexity``: every
window ``[1, T]`` (first token BOS) contributes the NLL of tokens ``1..T-1``; the result
is exp of the mean over all predicted tokens of all windows. :func:`finish` evaluates
every split the data file holds (``val``, ``eval``, ``lee``: whichever
``benchmarks/accuracy.py --splits`` put there), as the own rows do.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="torch.save'd {'calib': [N,T], 'val'/'eval'/'lee': [M,T]} token ids")
    ap.add_argument("--result", required=True, help="where to write the result JSON")
    ap.add_argument("--model", required=True, help="local Hugging Face model folder")
    ap.add_argument("--threads", type=int, default=2)
    if extra:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids).logits.float()
        nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(nll / count)


SPLITS = ("val", "eval", "lee")


def finish(args, model, quant_s: float, **info) -> None:
    """Evaluate every split of the data file and write the result JSON."""
    data = torch.load(args.data)
    ppl, eval_s = {}, {}
    for split in SPLITS:
        if split in data:
            t0 = time.perf_counter()
            ppl[split] = perplexity(model, data[split])
            eval_s[split] = time.perf_counter() - t0
    out = {
        "ppl": ppl,
        "quant_s": quant_s,
        "eval_s": eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        **info,
    }
    Path(args.result).write_text(json.dumps(out))
