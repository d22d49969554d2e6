"""torchao 8da4w (int8 dynamic per-token activations, int4 weights) on the benchmark windows.

Runs in ``benchmarks/peers/venv-torchao``. No calibration: torchao rounds to nearest.
Activations are torchao's default for this config (asymmetric per-token int8).
"""

from __future__ import annotations

import time

import torch
from _common import finish, parse_args
from transformers import AutoModelForCausalLM


def main() -> None:
    args = parse_args(lambda ap: ap.add_argument("--group-size", type=int, default=-1))
    import torchao
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    gran = PerAxis(0) if args.group_size <= 0 else PerGroup(args.group_size)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=gran)
    t0 = time.perf_counter()
    # lm_head stays float, as in every qqq_compile row.
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    quant_s = time.perf_counter() - t0
    finish(args, model, quant_s, torchao=torchao.__version__, group_size=args.group_size)


if __name__ == "__main__":
    main()
