"""The KV-cache rewrite: prefill + decode steps reproduce the full-sequence graph."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.runtime.kv_cache import CacheError, add_kv_cache
from tests.conftest import tiny_calib, tiny_config, tiny_model

ARCHS = ["llama", "llama_mha", "qwen2", "mistral", "gemma", "gemma3"]
aten = torch.ops.aten


def arch_model(arch: str) -> torch.nn.Module:
    if arch != "gemma3":
        return tiny_model(arch)
    import transformers as tf

    cfg = tf.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        use_cache=False,
    )
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(cfg).eval()


def stepwise(cached, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position from one prefill call and then one call per token."""
    b, t = ids.shape
    with torch.no_grad():
        outs = [cached(ids[:, :prefill], torch.ones(b, prefill, dtype=torch.long), torch.arange(prefill))]
        for i in range(prefill, t):
            outs.append(cached(ids[:, i : i + 1], torch.ones(b, i + 1, dtype=torch.long), torch.tensor([i])))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_float_graph_prefill_then_decode_matches_full_sequence(arch):
    model = arch_model(arch)
    gm = capture(model, {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    # Exact attention: the rewrite itself is checked to float rounding (bf16 attention: below).
    cached, spec = add_kv_cache(gm, max_batch=2, max_len=48, last_logits_only=False, bf16_attention=False)
    assert len(spec.layers) == 2 and spec.positions_replaced >= 1
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = gm(input_ids=ids).logits
    got = stepwise(cached, ids, prefill=10)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    # The cache graph calls SDPA with an explicit mask, never is_causal.
    for n in cached.graph.nodes:
        if n.target is aten.scaled_dot_product_attention.default:
            assert n.args[3] is not None and n.args[5] is False


def test_kv_cache_holds_only_kv_heads():
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    cached, spec = add_kv_cache(gm, max_batch=3, max_len=40)
    k0 = cached.get_buffer("qqq_k_cache_0")
    assert tuple(k0.shape) == (3, 2, 41, 16)  # [rows, KV heads (GQA 4:2), max_len + spare slot, head dim]
    assert spec.cache_bytes() == 2 * 2 * 3 * 2 * 40 * 16 * 4


@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16], ids=["f32", "bf16"])
def test_the_mask_is_built_once_for_every_attention(cache_dtype, monkeypatch):
    """With the C++ kernels the step builds its mask with one ``qqq_cpu::attention_mask`` call
    that every layer's attention reads (Inductor recomputed the portable chain inside each
    layer's kernel); the logits equal those of the portable graph (the ops' chain, SDPA), to
    bf16 rounding with a bf16 cache."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and cpu.ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: the portable mask is the only one")
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    cached, _ = add_kv_cache(gm, max_batch=2, max_len=40, cache_dtype=cache_dtype, bf16_attention=False)
    nodes = list(cached.graph.nodes)
    masks = [n for n in nodes if n.target is torch.ops.qqq_cpu.attention_mask.default]
    attn_ops = (torch.ops.qqq_cpu.attention_f32kv.default, torch.ops.qqq_cpu.attention_bf16kv.default)
    attention = [n for n in nodes if n.target in attn_ops]
    assert len(masks) == 1 and len(attention) == 2
    assert all(n.args[3] is masks[0] for n in attention)
    assert not [n for n in nodes if n.target in (aten.bitwise_or.Tensor, aten.le.Tensor)]

    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        got = cached(ids, mask, torch.arange(12))
        monkeypatch.setattr(cpu, "ensure_cpp_kernels", lambda: False)  # the rewrite without the kernels
        portable, _ = add_kv_cache(gm, max_batch=2, max_len=40, cache_dtype=cache_dtype, bf16_attention=False)
        monkeypatch.undo()
        assert not [n for n in portable.graph.nodes if n.target is torch.ops.qqq_cpu.attention_mask.default]
        want = portable(ids, mask, torch.arange(12))
    if cache_dtype is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the bf16 cache's prefill takes bf16 dot products, the portable SDPA fp32 ones
        assert sqnr_db(want, got) > 45


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_w4a8_graph_cache_matches_full_sequence(arch):
    model = tiny_model(arch)
    compiled = qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    gm = compiled.graph_module
    assert any(n.target is torch.ops.qqq.w4a8_linear.default for n in gm.graph.nodes)
    cached, _ = add_kv_cache(gm, max_batch=2, max_len=40, last_logits_only=False, bf16_attention=False)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = gm(input_ids=ids).logits
    got = stepwise(cached, ids, prefill=8)
    # Per-token activation quantization makes each token's math independent of the
    # others, so the cached graph agrees to float rounding (measured > 100 dB).
    assert sqnr_db(full, got) > 90


def test_last_logits_only_slices_before_the_lm_head():
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    cached, _ = add_kv_cache(gm, max_batch=1, max_len=32, bf16_attention=False)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = cached(ids, torch.ones(1, 12, dtype=torch.long), torch.arange(12))
        full = gm(input_ids=ids).logits
    assert out.shape == (1, 1, 256)
    torch.testing.assert_close(out[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    head = [n for n in cached.graph.nodes if n.target is aten.linear.default][-1]
    assert head.args[0].target is aten.slice.Tensor and head.args[0].args[1:3] == (1, -1)


def test_left_padding_rows_match_unpadded_rows():
    """A left-padded row gets its own positions (0, 1, ... from its first valid slot), so it
    agrees with the full-sequence graph run on it alone; with exact attention to float
    rounding, and with the default bf16 prefill attention within bf16's rounding of that."""
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    short = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    long = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        alone = torch.stack([gm(input_ids=short).logits[0, -1], gm(input_ids=long).logits[0, -1]])
        for bf16 in (False, True):
            cached, spec = add_kv_cache(gm, max_batch=2, max_len=32, bf16_attention=bf16)
            both = cached(ids, mask, torch.arange(9))[:, 0]
            assert torch.isfinite(both).all() and spec.row_positions >= 1
            if bf16:
                assert sqnr_db(alone, both) > 40
            else:
                torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32_products", "bf16_products"])
def test_a_row_after_other_slots_computes_what_it_computes_alone(bf16):
    """What a server's joining request meets: a W4A8 model's prompt placed at later cache
    slots than a lone ``generate()`` puts it (the slots before it invalid, in a batch with
    another row, left-padded behind its own slot's padding tokens) gives bit for bit the lone
    row's logits: its positions are its own, the int8 linears are exact per row, and the
    prefill kernel tiles its keys from its first one. With the shared slot positions the
    rotary angles differed by float rounding, which bf16 products turned into different
    greedy tokens (the server test failed)."""
    compiled = qc.compile(
        tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False
    )
    gm = compiled.graph_module
    prompt = torch.randint(1, 256, (1, 70), generator=torch.Generator().manual_seed(9))
    other = torch.randint(1, 256, (1, 77), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        lone, _ = add_kv_cache(gm, max_batch=1, max_len=96, bf16_attention=bf16)
        want = lone(prompt, torch.ones(1, 70, dtype=torch.long), torch.arange(70))
        step, _ = add_kv_cache(gm, max_batch=2, max_len=96, bf16_attention=bf16)
        ids = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), prompt], 1), other])
        mask = torch.ones(2, 77, dtype=torch.long)
        mask[0, :7] = 0  # seven slots before the prompt: padding (or another request's old slots)
        got = step(ids, mask, torch.arange(77))
    assert torch.equal(got[:1], want)


def test_the_users_graph_is_untouched():
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    before = gm.code
    add_kv_cache(gm, max_batch=1, max_len=16)
    assert gm.code == before and not any(n.startswith("qqq_k_cache") for n, _ in gm.named_buffers())


def test_graph_without_attention_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    gm = torch.export.export(mlp, (torch.randint(0, 16, (2, 4)),)).module()
    gm.graph.find_nodes(op="placeholder")[0].target = "input_ids"
    with pytest.raises(CacheError, match="no scaled_dot_product_attention"):
        add_kv_cache(gm, max_batch=1, max_len=8)


def test_bad_sizes_are_refused():
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    with pytest.raises(CacheError, match="max_batch must be >= 1"):
        add_kv_cache(gm, max_batch=0, max_len=8)


def test_tiny_config_has_no_sliding_window_for_mistral():
    # The Mistral fixture runs without a window; the window limit is tested in test_generation.
    assert tiny_config("mistral").sliding_window is None


@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16], ids=["f32", "bf16"])
def test_a_bf16_cache_prefills_with_bf16_dot_products(cache_dtype):
    """Both caches' prefill runs, on a CPU with AVX512-BF16, the bf16 dot-product kernel,
    once per layer, within bf16 rounding of exact attention's logits (``bf16_attention=False``,
    the fp32 kernel); without AVX512-BF16 an fp32 cache computes exactly that."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and cpu.ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: no C++ attention")
    gm = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))}).graph_module
    step, _ = add_kv_cache(gm, max_batch=1, max_len=64, cache_dtype=cache_dtype)
    exact, _ = add_kv_cache(gm, max_batch=1, max_len=64, bf16_attention=False)
    bf16_dot = "avx512_bf16" in cpu._cpu_flags()
    path = "attention_prefill_bf16" if bf16_dot else "attention_prefill"
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    args = (ids, torch.ones(1, 40, dtype=torch.long), torch.arange(40))
    with torch.no_grad():
        before = cpu.cpp_path_counts()[path]
        got = step(*args)
        assert cpu.cpp_path_counts()[path] == before + 2
        want = exact(*args)
    db = sqnr_db(want, got)
    if bf16_dot:
        assert 45 < db < 80  # the rounding happened, and no more than bf16's (measured 59-64 dB)
    elif cache_dtype is None:
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernel, fp32 products
