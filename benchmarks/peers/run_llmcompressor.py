"""llm-compressor GPTQ W4A8 (optionally after SmoothQuant) on the benchmark windows.

Runs in ``benchmarks/peers/venv-llmc``. Weights int4 symmetric per output channel
(its ``W4A8`` preset is group 128, which refuses SmolLM2's K = 576), activations int8
dynamic per-token symmetric; lm_head ignored. Calibrates on the same windows as the
qqq_compile rows and evaluates the model as ``oneshot`` leaves it (fake-quantized).
"""

from __future__ import annotations

import time

import torch
from _common import finish, parse_args
from transformers import AutoModelForCausalLM, AutoTokenizer

SCHEME = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }
}


def main() -> None:
    args = parse_args(lambda ap: ap.add_argument("--scheme", choices=["gptq", "smoothquant_gptq"], default="gptq"))
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    data = torch.load(args.data)
    calib = data["calib"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    recipe = []
    if args.scheme == "smoothquant_gptq":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe.append(SmoothQuantModifier(smoothing_strength=0.8))
    recipe.append(GPTQModifier(config_groups=SCHEME, ignore=["lm_head"]))
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        processor=tok,
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
    )
    quant_s = time.perf_counter() - t0
    finish(args, model, quant_s, llmcompressor=llmcompressor.__version__, scheme=args.scheme)


if __name__ == "__main__":
    main()
