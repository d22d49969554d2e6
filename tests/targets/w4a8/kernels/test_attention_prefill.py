"""``attention_prefill`` (csrc/attention_prefill_cpu.cpp): several query tokens over fp32
K/V, reached through ``qqq_cpu::attention_f32kv`` (the prefill step) and GPTQ's calibration
forwards (``targets/w4a8/calib_ops.py``).

The reference is a float64 softmax(QKᵀ·scale)·V written out here (masked scores set to
-inf; GQA by repeating K/V): an implementation independent of torch's SDPA and of the
kernel. Measured 127-134 dB against it on the shapes below, as close as fp32 SDPA itself
(128-134 dB), so the floor is 115 dB and the kernel must be within 3 dB of fp32 SDPA. Each
test proves through the path counter which path ran.

``bf16_dot`` (the decode step's prefill, on CPUs with AVX512-BF16): Q·scale, K, V and the
probabilities rounded to bf16, fp32 sums. Its reference is the same float64 formula on the
rounded Q·scale, K and V: measured 61-70 dB against it (what is left is the rounding of the
probabilities) and 46-55 dB against the exact result, 0.3-1.1 dB closer than torch's SDPA on
bf16 tensors; floors 58 dB and "no worse than bf16 SDPA by more than 1 dB".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.targets.w4a8.kernels import cpu

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def op(*args):
    return torch.ops.qqq_cpu.attention_f32kv(*args)  # looked up once the fixture loaded the kernels


def _reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k2, v2 = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k2.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)  # no key: zeros
    return p @ v2


def _mask(b, t, length, seed, *, holes=True):
    """The KV-cache rewrite's mask: causal over the last ``t`` slots, left padding / holes per
    row, each query's own slot always visible."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(length - t, length)
    causal = torch.arange(length)[None, :] <= pos[:, None]
    valid = torch.rand(b, length, generator=g) > 0.2 if holes else torch.ones(b, length, dtype=torch.bool)
    own = torch.arange(length)[None, :] == pos[:, None]
    return (causal[None, None] & valid[:, None, None, :]) | own[None, None]


BF16_CPU = "avx512_bf16" in cpu._cpu_flags()  # else bf16_dot falls back to the fp32 kernel


def _run(q, k, v, mask, scale, bf16_dot=False):
    path = "attention_prefill_bf16" if bf16_dot and BF16_CPU else "attention_prefill"
    before = cpu.cpp_path_counts()[path]
    got = op(q, k, v, mask, scale, bf16_dot)
    assert cpu.cpp_path_counts()[path] == before + 1, f"the {path} kernel did not run"
    return got


def _want(q, k, v, mask, scale, bf16_dot):
    """(reference, floor in dB) for what the kernel computes: the exact result, or with
    ``bf16_dot`` on a BF16 CPU the exact result on bf16-rounded Q·scale, K and V."""
    if not (bf16_dot and BF16_CPU):
        return _reference(q, k, v, mask, scale), 115
    r = lambda x: x.bfloat16().float()  # noqa: E731
    return _reference(r(q * scale), r(k), r(v), mask, 1.0), 58


# (b, h, hkv, d, t, length): SmolLM2 (9/3 x 64) as a prefill chunk and as a calibration batch
# (K/V already repeated to 9 heads), Qwen2.5-0.5B (14/2 x 64), Llama-3-8B (32/8 x 128), MHA at
# D 16 and 32, a single KV head; token counts that leave partial query and key tiles (32 / 64),
# an odd key count.
SHAPES = [
    (1, 9, 3, 64, 256, 512),
    (2, 9, 9, 64, 100, 100),
    (1, 14, 2, 64, 37, 300),
    (1, 32, 8, 128, 65, 65),
    (2, 4, 4, 16, 33, 129),
    (3, 6, 6, 32, 5, 200),
    (1, 8, 1, 64, 2, 2),
    (1, 4, 2, 64, 40, 77),
]


def _inputs(b, h, hkv, d, t, length):
    """q (scaled up for wider scores: a sharper softmax), k, v and the step's mask."""
    g = torch.Generator().manual_seed(t + length)
    q = torch.randn(b, h, t, d, generator=g) * 2
    k, v = torch.randn(b, hkv, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    return q, k, v, _mask(b, t, length, seed=t)


@pytest.mark.parametrize(("b", "h", "hkv", "d", "t", "length"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_a_float64_reference_as_closely_as_fp32_sdpa(b, h, hkv, d, t, length, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, mask = _inputs(b, h, hkv, d, t, length)
        got = _run(q, k, v, mask, d**-0.5)
    finally:
        torch.set_num_threads(saved)
    want = _reference(q, k, v, mask, d**-0.5)
    fp32 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=h != hkv)
    assert got.shape == (b, h, t, d)
    assert got.transpose(1, 2).is_contiguous()  # laid out [B, T, H, D], as torch's CPU SDPA
    assert sqnr_db(want, got) > 115
    # Within 3 dB of fp32 SDPA's own error (both near-exact past 135 dB: two keys).
    assert sqnr_db(want, got) > min(sqnr_db(want, fp32) - 3, 135)


@pytest.mark.parametrize("bf16_dot", [False, True], ids=["fp32", "bf16_dot"])
def test_broadcast_masks_strided_inputs_and_a_row_with_no_key(bf16_dot):
    """A [1, 1, T, L] causal mask and a [B, 1, 1, L] padding mask broadcast like SDPA's;
    q/k/v as strided views (the rewrite's cache slices); a token that sees no key gets zeros."""
    g = torch.Generator().manual_seed(0)
    b, h, t, length, d = 2, 4, 40, 90, 32
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    kbuf, vbuf = torch.randn(b, 2, length + 5, d, generator=g), torch.randn(b, 2, length + 5, d, generator=g)
    k, v = kbuf[:, :, :length], vbuf[:, :, :length]
    causal = (torch.arange(length)[None, :] <= torch.arange(length - t, length)[:, None])[None, None]
    pad = torch.rand(b, 1, 1, length, generator=g) > 0.5
    for mask in (causal, pad):
        got = _run(q, k, v, mask, 0.2, bf16_dot)
        want, floor = _want(q, k, v, mask.expand(b, 1, t, length), 0.2, bf16_dot)
        assert sqnr_db(want, got) > floor
    hidden = causal.expand(b, 1, t, length).clone()
    hidden[1, 0, 7] = False  # token 7 of row 1 sees nothing
    got = _run(q, k, v, hidden, 0.2, bf16_dot)
    assert torch.equal(got[1, :, 7], torch.zeros(h, d))
    assert torch.isfinite(got).all()
    want, floor = _want(q, k, v, hidden, 0.2, bf16_dot)
    assert sqnr_db(want, got) > floor


# NaN in every key from ``seen`` on. 256 tokens at positions 0-255: the first four items (of
# 32 tokens) see keys 0-127 only. At positions 1-256 the first item sees keys 0-32: an odd
# count, so with bf16_dot its last key pair is (32, 33) and key 33 must not be multiplied.
@pytest.mark.parametrize(("length", "seen"), [(256, 128), (257, 33)])
@pytest.mark.parametrize("bf16_dot", [False, True], ids=["fp32", "bf16_dot"])
def test_tiles_the_mask_hides_are_not_read(bf16_dot, length, seen):
    """A causal mask hides the keys after each query tile: NaN there must not reach the output."""
    g = torch.Generator().manual_seed(1)
    t = 256
    q = torch.randn(1, 3, t, 64, generator=g)
    k, v = torch.randn(1, 3, length, 64, generator=g), torch.randn(1, 3, length, 64, generator=g)
    mask = _mask(1, t, length, seed=1, holes=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, seen:], v2[:, :, seen:] = float("nan"), float("nan")  # keys only later tokens see
    got = _run(q, k2, v2, mask, 0.125, bf16_dot)
    want, floor = _want(q, k, v, mask, 0.125, bf16_dot)
    first = seen - (length - t)  # the tokens whose items see no NaN key
    assert torch.isfinite(got[:, :, :first]).all()  # the NaN keys were skipped, never multiplied
    assert sqnr_db(want[:, :, :first], got[:, :, :first]) > floor


@pytest.mark.parametrize(("b", "h", "hkv", "d", "t", "length"), SHAPES)
def test_bf16_dot_matches_the_reference_on_bf16_inputs(b, h, hkv, d, t, length):
    """The bf16 dot products against the float64 formula on bf16-rounded inputs, and no less
    accurate than torch's SDPA on bf16 tensors; different from the fp32 kernel's result (the
    rounding happened). Without AVX512-BF16 the call takes the fp32 kernel (``_run`` checks)."""
    q, k, v, mask = _inputs(b, h, hkv, d, t, length)
    scale = d**-0.5
    got = _run(q, k, v, mask, scale, bf16_dot=True)
    want, floor = _want(q, k, v, mask, scale, bf16_dot=True)
    assert sqnr_db(want, got) > floor
    if BF16_CPU:
        exact = _reference(q, k, v, mask, scale)
        bf16 = F.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, scale=scale, enable_gqa=h != hkv
        )
        assert sqnr_db(exact, got) > sqnr_db(exact, bf16.float()) - 1
        assert sqnr_db(exact, got) < 80  # not the fp32 kernel's 115+ dB


@pytest.mark.parametrize(
    "case",
    ["head_dim_80", "ten_heads_per_kv_head", "float_mask", "bf16"],
)
def test_shapes_it_does_not_cover_take_sdpa(case):
    g = torch.Generator().manual_seed(2)
    b, h, hkv, t, length, d = 1, 4, 2, 9, 20, 64
    if case == "head_dim_80":
        d = 80
    if case == "ten_heads_per_kv_head":
        h, hkv = 10, 1
    q = torch.randn(b, h, t, d, generator=g)
    k, v = torch.randn(b, hkv, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    mask = _mask(b, t, length, seed=2)
    if case == "float_mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    if case == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    before = cpu.cpp_path_counts()["attention_prefill"]
    got = op(q, k, v, mask, 0.1)
    assert cpu.cpp_path_counts()["attention_prefill"] == before  # SDPA, not the kernel
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1, enable_gqa=h != hkv)
    torch.testing.assert_close(got, want)


def _mask_reference(valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The KV-cache step's rule, written out element by element (kv_cache.py's portable chain
    is the other implementation): key j is visible to position p when j <= p and the row's
    key is valid, and always when j == p."""
    b, length = valid.shape
    out = torch.zeros(b, 1, len(pos), length, dtype=torch.bool)
    for r in range(b):
        for t, p in enumerate(pos.tolist()):
            for j in range(length):
                out[r, 0, t, j] = (j <= p and bool(valid[r, j])) or j == p
    return out


@pytest.mark.parametrize("b,t,length,start", [(1, 1, 9, 8), (1, 5, 5, 0), (2, 7, 40, 33), (3, 130, 300, 170)])
def test_step_mask_matches_the_rule(b, t, length, start):
    """``qqq_cpu::attention_mask``: left-padded rows (zeros before each row's first token),
    prefill chunks after earlier ones (positions start past 0) and single decode tokens."""
    g = torch.Generator().manual_seed(b * 1000 + t)
    valid = torch.ones(b, length, dtype=torch.long)
    for r in range(b):
        valid[r, : int(torch.randint(0, max(1, start), (1,), generator=g))] = 0
    pos = torch.arange(start, start + t)
    got = torch.ops.qqq_cpu.attention_mask(valid, pos)
    assert got.dtype == torch.bool and got.shape == (b, 1, t, length)
    assert torch.equal(got, _mask_reference(valid, pos))


@pytest.mark.parametrize("bf16_dot", [False, True], ids=["fp32", "bf16_dot"])
@pytest.mark.parametrize("pad", [37, 64])
def test_a_row_at_later_slots_equals_the_row_alone_bit_for_bit(bf16_dot, pad):
    """Key tiles start at each row's first key (the origin), so a row whose keys start at slot
    ``pad`` (left padding, a server's joining request) is tiled, summed and rounded as it is
    alone: equal bit for bit, in a batch with another row too (an odd origin included: the
    bf16 V pairs start there). The padding tokens, which see their own slot only, get their
    own V (bf16-rounded with bf16_dot), as softmax over one key gives, and do not move the
    origin."""
    g = torch.Generator().manual_seed(pad)
    h, hkv, t, d = 9, 3, 200, 64
    q, k, v = (torch.randn(1, n, t, d, generator=g) for n in (h, hkv, hkv))
    alone = _run(q, k, v, torch.ones(t, t, dtype=torch.bool).tril()[None, None], 0.125, bf16_dot)
    length = pad + t
    mask = torch.zeros(2, 1, length, length, dtype=torch.bool)
    mask[0, 0, pad:, pad:] = torch.ones(t, t, dtype=torch.bool).tril()
    mask[0, 0, torch.arange(pad), torch.arange(pad)] = True  # padding tokens see their own slot
    mask[1, 0] = torch.ones(length, length, dtype=torch.bool).tril()
    extra = lambda n: torch.randn(2, n, length, d, generator=g)  # noqa: E731
    qb, kb, vb = extra(h), extra(hkv), extra(hkv)
    qb[:1, :, pad:], kb[:1, :, pad:], vb[:1, :, pad:] = q, k, v
    got = _run(qb, kb, vb, mask, 0.125, bf16_dot)
    assert torch.equal(got[:1, :, pad:], alone)
    own = vb[0, :, :pad].repeat_interleave(h // hkv, 0)
    want_pad = own.bfloat16().float() if bf16_dot and BF16_CPU else own
    assert torch.equal(got[0, :, :pad], want_pad)
    ref, floor = _want(qb[1:], kb[1:], vb[1:], mask[1:], 0.125, bf16_dot)
    assert sqnr_db(ref, got[1:]) > floor
