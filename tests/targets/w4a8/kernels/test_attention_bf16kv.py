"""``qqq_cpu::attention_bf16kv``: one-token attention over a bf16 KV cache (K d-major).

The reference is torch's SDPA in fp32 over the same bf16 cache upcast (an independent
implementation); the kernel differs from it by float rounding only (its exp is a
polynomial): 124-136 dB measured on these shapes, so the floor is 100 dB. Each test proves
through the path counter that the kernel, not the SDPA fallback, ran.
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
    k_buf = torch.randn(b, hkv, d, length + 7, generator=g).to(torch.bfloat16)
    v_buf = torch.randn(b, hkv, length + 7, d, generator=g).to(torch.bfloat16)
    return k_buf[..., :length], v_buf[:, :, :length]


def _layout(t: torch.Tensor) -> list[int]:
    return [st for st, n in zip(t.stride(), t.shape, strict=True) if n > 1]  # a size-1 dim's stride is free


def _sdpa_layout(q: torch.Tensor) -> list[int]:
    """[B, H, T, D] laid out [B, T, H, D]: what torch's CPU flash SDPA returns and export's
    fake assumes (captured graphs view the output that way), and what the op promises."""
    b, h, t, d = q.shape
    return _layout(torch.empty(b, t, h, d).transpose(1, 2))


def _reference(q, k_t, v, mask, scale):
    return F.scaled_dot_product_attention(
        q, k_t.transpose(2, 3).float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_t.shape[1]
    )


@pytest.mark.parametrize(
    ("b", "h", "hkv", "d", "length"),
    [(1, 9, 3, 64, 513), (2, 8, 2, 128, 100), (1, 4, 4, 16, 7), (3, 14, 2, 32, 300), (1, 8, 1, 64, 1)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_matches_sdpa_over_the_upcast_cache(b, h, hkv, d, length, threads) -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(b, h, 1, d, generator=g)
        k_t, v = _cache(b, hkv, d, length, seed=length + 1)
        mask = torch.rand(b, 1, 1, length, generator=g) > 0.3  # left padding and holes
        mask[..., -1] = True  # the query's own slot, always visible in the rewrite's mask
        before = cpu.cpp_path_counts()["attention_bf16kv"]
        got = torch.ops.qqq_cpu.attention_bf16kv(q, k_t, v, mask, d**-0.5)
        assert cpu.cpp_path_counts()["attention_bf16kv"] == before + 1
    finally:
        torch.set_num_threads(saved)
    want = _reference(q, k_t, v, mask, d**-0.5)
    assert got.shape == want.shape and _layout(got) == _sdpa_layout(q)
    assert sqnr_db(want, got) > 100


def test_several_tokens_take_the_prefill_kernel_with_bf16_dot_products() -> None:
    """Several query tokens (a prefill) over a bf16 cache: the prefill kernel on the upcast
    cache with bf16 dot products where the CPU has AVX512-BF16 (fp32 products elsewhere), in
    SDPA's output layout; within bf16 rounding of fp32 SDPA over the same cache (measured
    54-55 dB: q and the probabilities are the only values rounded beyond the cache's own)."""
    q = torch.randn(2, 6, 5, 64)
    k_t, v = _cache(2, 3, 64, 40, seed=0)
    mask = torch.ones(2, 1, 5, 40, dtype=torch.bool).tril(diagonal=35)
    path = "attention_prefill_bf16" if "avx512_bf16" in cpu._cpu_flags() else "attention_prefill"
    before, one_token = cpu.cpp_path_counts()[path], cpu.cpp_path_counts()["attention_bf16kv"]
    got = torch.ops.qqq_cpu.attention_bf16kv(q, k_t, v, mask, 0.125)
    assert cpu.cpp_path_counts()[path] == before + 1
    assert cpu.cpp_path_counts()["attention_bf16kv"] == one_token  # not the one-token kernel
    want = _reference(q, k_t, v, mask, 0.125)
    assert _layout(got) == _sdpa_layout(q)
    assert sqnr_db(want, got) > (45 if path == "attention_prefill_bf16" else 110)


def test_bf16_cache_step_runs_the_kernel_and_tracks_the_fp32_cache_step() -> None:
    """The KV-cache rewrite with ``cache_dtype=torch.bfloat16`` (eager step) routes decode
    attention to the kernel and stays close to the fp32-cache step."""
    import qqq_compile as qc
    from qqq_compile.runtime.steps import build_step
    from tests.conftest import tiny_calib, tiny_model

    cm = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    kw = {"max_batch": 2, "max_len": 32, "runtime": "eager"}
    ref, bf16 = build_step(cm.graph_module, **kw), build_step(cm.graph_module, cache_dtype=torch.bfloat16, **kw)
    assert {b.dtype for n, b in bf16.graph_module.named_buffers() if "_cache_" in n} == {torch.bfloat16}
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(3))
    before = cpu.cpp_path_counts()["attention_bf16kv"]
    outs = []
    for step in (ref, bf16):
        out = [step(ids[:, :10], torch.ones(2, 10, dtype=torch.long), torch.arange(10))]
        for i in range(10, 14):
            out.append(step(ids[:, i : i + 1], torch.ones(2, i + 1, dtype=torch.long), torch.tensor([i])))
        outs.append(torch.cat(out, 1))
    layers = sum(1 for n in bf16.graph_module.graph.nodes if n.target is torch.ops.qqq_cpu.attention_bf16kv.default)
    assert layers == 2 and cpu.cpp_path_counts()["attention_bf16kv"] == before + 4 * layers  # 4 decode steps
    # bf16 rounding of K/V, amplified by the W4A8 graph's int8 activations: 40.8 dB measured.
    assert sqnr_db(outs[0], outs[1]) > 30


def test_bf16_cache_without_the_kernels_uses_sdpa_over_the_upcast_cache(monkeypatch) -> None:
    """Without the C++ kernels the rewrite emits SDPA over the cache upcast to fp32: the same
    cache; the same attention up to the kernels' bf16 dot products at prefill (measured
    40.5-42.5 dB on the logits of the tiny W4A8 model over five prompts, 143 dB before the
    prefill took bf16 products; int8 activation rounding flips widen the gap)."""
    import qqq_compile as qc
    from qqq_compile.runtime.steps import build_step
    from tests.conftest import tiny_calib, tiny_model

    cm = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    kw = {"max_batch": 1, "max_len": 32, "runtime": "eager", "cache_dtype": torch.bfloat16}
    with_kernel = build_step(cm.graph_module, **kw)
    monkeypatch.setattr(cpu, "ensure_cpp_kernels", lambda: False)
    without = build_step(cm.graph_module, **kw)
    targets = {n.target for n in without.graph_module.graph.nodes}
    assert torch.ops.qqq_cpu.attention_bf16kv.default not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    outs = []
    for step in (with_kernel, without):
        out = [step(ids[:, :8], torch.ones(1, 8, dtype=torch.long), torch.arange(8))]
        for i in range(8, 12):
            out.append(step(ids[:, i : i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([i])))
        outs.append(torch.cat(out, 1))
    assert sqnr_db(outs[1], outs[0]) > (35 if "avx512_bf16" in cpu._cpu_flags() else 60)


def test_bf16_cache_aot_step_runs_the_kernel_and_matches_eager(tmp_path) -> None:
    """The AOTInductor package calls the kernel through the dispatcher (its fake gives the
    output layout export needs) and agrees with the eager bf16 step up to float rounding
    (Inductor fuses RMSNorm/RoPE in another order; measured 130+ dB, as for the fp32 cache)."""
    import qqq_compile as qc
    from qqq_compile.runtime.steps import build_step
    from tests.conftest import tiny_calib, tiny_model

    cm = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    kw = {"max_batch": 1, "max_len": 24, "cache_dtype": torch.bfloat16, "package_dir": tmp_path, "progress": False}
    eager, aot = build_step(cm.graph_module, runtime="eager", **kw), build_step(cm.graph_module, runtime="aot", **kw)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(7))
    outs = []
    for step in (eager, aot):
        out = [step(ids[:, :8], torch.ones(1, 8, dtype=torch.long), torch.arange(8))]
        before = cpu.cpp_path_counts()["attention_bf16kv"]
        for i in range(8, 12):
            out.append(step(ids[:, i : i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([i])))
        assert cpu.cpp_path_counts()["attention_bf16kv"] == before + 4 * 2  # 4 tokens x 2 layers
        outs.append(torch.cat(out, 1))
    assert sqnr_db(outs[0], outs[1]) > 100
