"""A user-written pass in a few lines: keep the last decoder layer's MLP in float.

Run: python examples/custom_pass.py
"""

from __future__ import annotations

import torch
import transformers as tf

import qqq_compile as qc
from qqq_compile.graph import info, linear_sites, partition


@qc.register_pass("keep_last_mlp_float")
class KeepLastMLPFloat(qc.QQQPass):
    """Drop the packed weights of the last block's MLP so ``lower`` leaves it in float.

    Preconditions: a quantizing pass annotated the linears. Position: just before ``lower``.
    """

    def call(self, gm, ctx):
        last = partition(gm).blocks[-1].name
        changed = False
        for site in linear_sites(gm):
            li = info(site.node)
            if li is not None and li.packed is not None and site.name.startswith(last + ".mlp."):
                li.packed, li.method, li.skipped = None, None, "kept in float by keep_last_mlp_float"
                changed = True
        return qc.PassResult(gm, changed)


def main() -> qc.CompiledModel:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    passes = qc.rtn_w4a8()
    passes.insert(-1, KeepLastMLPFloat())  # before "lower"
    compiled = qc.compile(
        model, calib=[torch.randint(0, 256, (1, 32)) for _ in range(4)], passes=passes, progress=False
    )
    print(compiled)
    for li in compiled.linears():
        print(f"{li.fqn:40s} {'w4a8' if li.lowered else 'float':6s} {li.skipped or ''}")
    return compiled


if __name__ == "__main__":
    main()
