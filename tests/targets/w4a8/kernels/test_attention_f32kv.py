"""``qqq_cpu::attention_f32kv``: one-token attention over an fp32 KV cache in SDPA's layout.

Several query tokens (prefill) take ``attention_prefill``: tests/.../test_attention_prefill.py.

The reference is torch's SDPA in float64 over the same cache (an independent
implementation): the kernel's error against it is float rounding, at or below fp32 SDPA's own
(measured 0.9-1.0x of SDPA's relative error on these shapes): 123 dB at 2049 keys, more on
fewer, so the floor is 115 dB, and the kernel must be within 3 dB of fp32 SDPA. Each test
proves through the path counter which path ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.targets.w4a8.kernels import cpu

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _cache(b: int, hkv: int, d: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Views into bigger buffers, as the KV-cache rewrite passes them (spare slots past L).
    k_buf = torch.randn(b, hkv, length + 7, d, generator=g)
    v_buf = torch.randn(b, hkv, length + 7, d, generator=g)
    return k_buf[:, :, :length], v_buf[:, :, :length]


def _layout(t: torch.Tensor) -> list[int]:
    return [st for st, n in zip(t.stride(), t.shape, strict=True) if n > 1]  # a size-1 dim's stride is free


def _sdpa_layout(q: torch.Tensor) -> list[int]:
    b, h, t, d = q.shape
    return _layout(torch.empty(b, t, h, d).transpose(1, 2))


def _reference(q, k, v, mask, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=gqa
    ).float()


# Head layouts of real models: SmolLM2 (9/3 x 64), Qwen2.5-0.5B (14/2 x 64), Llama-3-8B
# (32/8 x 128), plus MHA, a single KV head and a key count below one 16-key block.
@pytest.mark.parametrize(
    ("b", "h", "hkv", "d", "length"),
    [
        (1, 9, 3, 64, 513),
        (1, 14, 2, 64, 1000),
        (1, 32, 8, 128, 2049),
        (2, 8, 8, 128, 100),
        (3, 4, 1, 16, 7),
        (1, 8, 1, 32, 1),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_matches_float64_sdpa(b, h, hkv, d, length, threads) -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(b, h, 1, d, generator=g)
        k, v = _cache(b, hkv, d, length, seed=length + 1)
        mask = torch.rand(b, 1, 1, length, generator=g) > 0.3  # left padding and holes
        mask[..., -1] = True  # the query's own slot, always visible in the rewrite's mask
        before = cpu.cpp_path_counts()["attention_f32kv"]
        got = torch.ops.qqq_cpu.attention_f32kv(q, k, v, mask, d**-0.5)
        assert cpu.cpp_path_counts()["attention_f32kv"] == before + 1
    finally:
        torch.set_num_threads(saved)
    want = _reference(q, k, v, mask, d**-0.5)
    fp32_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=h != hkv)
    assert got.shape == want.shape and _layout(got) == _sdpa_layout(q)
    assert sqnr_db(want, got) > 115
    assert not sqnr_db(want, got) < sqnr_db(want, fp32_sdpa) - 3  # as exact as torch's own fp32 SDPA (inf: exact)


def test_several_tokens_take_the_prefill_kernel_with_the_same_layout() -> None:
    q = torch.randn(2, 6, 5, 64)
    k, v = _cache(2, 3, 64, 40, seed=0)
    mask = torch.ones(2, 1, 5, 40, dtype=torch.bool).tril(diagonal=35)
    before = cpu.cpp_path_counts()
    got = torch.ops.qqq_cpu.attention_f32kv(q, k, v, mask, 0.125)
    after = cpu.cpp_path_counts()
    assert after["attention_f32kv"] == before["attention_f32kv"]  # not the one-token kernel
    assert after["attention_prefill"] == before["attention_prefill"] + 1
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert _layout(got) == _sdpa_layout(q)
    torch.testing.assert_close(got, want)


def test_fp32_cache_step_runs_the_kernel_at_decode_and_matches_sdpa(monkeypatch) -> None:
    """The KV-cache rewrite of an fp32 CPU model routes attention to the op (the kernel at
    each decode step, the prefill kernel with bf16 dot products where the CPU has
    AVX512-BF16); without the C++ kernels it emits SDPA itself, and the two steps' logits
    agree to the rounding of those products."""
    import qqq_compile as qc
    from qqq_compile.runtime.steps import build_step
    from tests.conftest import tiny_calib, tiny_model

    cm = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    kw = {"max_batch": 2, "max_len": 32, "runtime": "eager"}
    fast = build_step(cm.graph_module, **kw)
    monkeypatch.setattr(cpu, "ensure_cpp_kernels", lambda: False)
    plain = build_step(cm.graph_module, **kw)
    op, sdpa = torch.ops.qqq_cpu.attention_f32kv.default, torch.ops.aten.scaled_dot_product_attention.default
    layers = sum(1 for n in fast.graph_module.graph.nodes if n.target is op)
    assert layers == 2 and not any(n.target is sdpa for n in fast.graph_module.graph.nodes)
    assert sum(1 for n in plain.graph_module.graph.nodes if n.target is sdpa) == 2
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(3))
    prefill_path = "attention_prefill_bf16" if "avx512_bf16" in cpu._cpu_flags() else "attention_prefill"
    before, before_prefill = cpu.cpp_path_counts()["attention_f32kv"], cpu.cpp_path_counts()[prefill_path]
    outs = []
    for step in (fast, plain):
        out = [step(ids[:, :10], torch.ones(2, 10, dtype=torch.long), torch.arange(10))]
        for i in range(10, 14):
            out.append(step(ids[:, i : i + 1], torch.ones(2, i + 1, dtype=torch.long), torch.tensor([i])))
        outs.append(torch.cat(out, 1))
    assert cpu.cpp_path_counts()["attention_f32kv"] == before + 4 * layers  # 4 decode steps, not the prefill
    assert cpu.cpp_path_counts()[prefill_path] == before_prefill + layers  # the prefill (fast step only)
    # Rounding of attention, amplified where an int8 activation rounds the other way
    # (measured 41.7 dB with bf16 products; fp32 products passed 60 dB).
    assert sqnr_db(outs[1], outs[0]) > (35 if prefill_path == "attention_prefill_bf16" else 60)
