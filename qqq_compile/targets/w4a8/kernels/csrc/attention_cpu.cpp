// Attention of new query tokens over a KV cache: bfloat16 (qqq_cpu::attention_bf16kv) or
// float32 (qqq_cpu::attention_f32kv).
//
// float32 (the default cache): K and V stay [B, Hkv, L, D], as SDPA reads them. At decode
// torch's CPU SDPA runs the one query token through its flash kernel as two GEMVs per head
// (MKL sgemv), 1.6 ms of a 6.7 ms SmolLM2 step at 512 context, 3x the bf16 kernel's time for
// 2x its bytes; the kernel below shares the bf16 one's work split and softmax, and builds
// each 16 keys' scores from their rows with one transposing reduction.
//
// Why: at decode (one query token) SDPA reads the whole KV cache once per layer: on SmolLM2
// at 512 context that is 23.6 MB per token in fp32, a fifth of everything a step reads.
// Storing the cache in bf16 halves it, but torch's CPU SDPA on bf16 inputs ran 4-5x slower
// than on fp32 here (30 layers, 512 keys, 1 thread), so the one-token case gets this kernel:
//  * K is cached d-major ([B, Hkv, D, L]): the scores of 16 keys are one zmm, built with a
//    broadcast FMA per d and no horizontal reductions; V stays [B, Hkv, L, D];
//  * the G query heads of a KV head share each loaded K/V vector (GQA);
//  * softmax and the weighted V sum in fp32 (the keys/values are bf16, the rest is not);
//  * work items are (batch row, KV head, key range); key ranges are merged with the
//    usual max/sum rescaling, so two threads share even a single KV head.
// More than one query token (prefill) takes attention_prefill (over the cache upcast to fp32, with
// its bf16 dot products where the CPU has AVX512-BF16).
//
// Numerics (one token): equal to fp32 SDPA over the bf16-rounded cache up to float rounding
// (the exp below is a degree-6 polynomial, ~2 ulp): measured 127 dB SQNR against it.

#include <ATen/ops/scaled_dot_product_attention.h>

#include <cmath>
#include <numeric>
#include <type_traits>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

inline __m512 bf16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// The two cache layouts: `k_scores` gives G heads' raw scores q.k of 16 keys [j, j + n) (n <= 16)
// at s[g * ld], `v_row` one V row chunk of 16 values in fp32.
struct Bf16DMajor {  // K [D, L] (d-major), bf16
  using T = uint16_t;
  template <int G, int D>
  static void k_scores(const float* q, int64_t ldq, const T* k, int64_t ldk, int64_t j, int64_t n, __m512* acc) {
    const __mmask16 mk = mask16(n);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m512 kv = bf16_to_f32(_mm256_maskz_loadu_epi16(mk, k + d * ldk + j));
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * ldq + d]), kv, acc[g]);
    }
  }
  static __m512 v16(const T* p) { return bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
};

struct F32RowMajor {  // K [L, D], fp32
  using T = float;
  template <int G, int D>
  static void k_scores(const float* q, int64_t ldq, const T* k, int64_t ldk, int64_t j, int64_t n, __m512* acc) {
    constexpr int C = D / 16;
    for (int g = 0; g < G; ++g) {
      __m512 qv[C], p[16];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * ldq + 16 * c);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        p[r] = _mm512_setzero_ps();
        if (r < n) {
          const float* kr = k + (j + r) * ldk;
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) p[r] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), p[r]);
        }
      }
      acc[g] = reduce16_ps(p);
    }
  }
  static __m512 v16(const T* p) { return _mm512_loadu_ps(p); }
};

struct Part {  // one work item's result for its G query heads
  float m[8], l[8];
  float o[8][128];
};

// Scores, softmax numerator and weighted V sum of G query heads over keys [j0, j1).
template <typename Layout, int G, int D>
void attend_range(const float* q, int64_t ldq, const typename Layout::T* kt, int64_t ldk, const typename Layout::T* v,
                  int64_t ldv, const bool* valid, int64_t j0, int64_t j1, float scale, float* s, Part& out) {
  const int64_t n = j1 - j0, np = ceil_div(n, 16) * 16;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = mask16(n - j);
    __m512 acc[G];
    Layout::template k_scores<G, D>(q, ldq, kt, ldk, j0 + j, std::min<int64_t>(16, n - j), acc);
    const __m512i vb = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, valid + j0 + j));
    const __mmask16 keep = _mm512_mask_cmpneq_epi32_mask(mk, vb, _mm512_setzero_si512());
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
      _mm512_store_ps(s + g * np + j,
                      _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(acc[g], _mm512_set1_ps(scale))));
  }
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * np;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < np; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sg + j));
    const float m = _mm512_reduce_max_ps(mx);
    out.m[g] = m;
    __m512 sum = _mm512_setzero_ps();
    if (m != -INFINITY) {
      for (int64_t j = 0; j < np; j += 16) {
        const __m512 x = _mm512_load_ps(sg + j);
        const __mmask16 fin = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(fin, exp_le0(_mm512_sub_ps(x, _mm512_set1_ps(m))));
        _mm512_store_ps(sg + j, e);
        sum = _mm512_add_ps(sum, e);
      }
    } else {
      for (int64_t j = 0; j < np; j += 16) _mm512_store_ps(sg + j, _mm512_setzero_ps());
    }
    out.l[g] = _mm512_reduce_add_ps(sum);
  }
  constexpr int C = D / 16;
  __m512 o[G][C];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) o[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const typename Layout::T* vr = v + (j0 + j) * ldv;
    __m512 vv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vv[c] = Layout::v16(vr + 16 * c);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(s[g * np + j]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) o[g][c] = _mm512_fmadd_ps(p, vv[c], o[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out.o[g] + 16 * c, o[g][c]);
}

// `kt`: K as `Layout` keeps it ([B, Hkv, D, L] d-major, or [B, Hkv, L, D]); `ldk` its stride
// between d rows (d-major) or keys.
template <typename Layout, int G, int D>
void decode_attention(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& valid,
                      float scale, at::Tensor& out) {
  constexpr bool kDMajor = std::is_same_v<Layout, Bf16DMajor>;
  const int64_t B = q.size(0), H = q.size(1), Hkv = kt.size(1), L = kt.size(kDMajor ? 3 : 2);
  // Key ranges of at least 128 keys, as many per (row, KV head) as spread the items evenly over
  // the threads: SmolLM2's 3 KV heads as 3 items left one of 2 threads idle a third of the
  // time; as 6, the fp32 kernel took 0.42-0.43x SDPA's time at 1500 keys instead of 0.48
  // (0.46-0.50x vs 0.50-0.51x at 512; the 30 layers timed against SDPA in one process, 100
  // rounds, three processes per variant).
  const int64_t threads = at::get_num_threads();
  const int64_t per_row = std::max<int64_t>(1, std::min<int64_t>(threads / std::gcd(B * Hkv, threads), L / 128));
  const int64_t chunk = ceil_div(ceil_div(L, per_row), 16) * 16;
  const int64_t nc = ceil_div(L, chunk);
  std::vector<Part> parts(B * Hkv * nc);
  const float* qp = q.data_ptr<float>();
  using T = typename Layout::T;
  const T* kp = static_cast<const T*>(kt.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  const bool* mp = valid.data_ptr<bool>();
  parallel_items(B * Hkv * nc, B * Hkv * nc > 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(G * chunk + 16)) scratch.resize(G * chunk + 16);
    float* s = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * nc), h = i / nc % Hkv, c = i % nc;
      const int64_t j0 = c * chunk, j1 = std::min(L, j0 + chunk);
      attend_range<Layout, G, D>(qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), kp + b * kt.stride(0) + h * kt.stride(1),
                         kt.stride(2), vp + b * v.stride(0) + h * v.stride(1), v.stride(2),
                         mp + b * valid.stride(0), j0, j1, scale, s, parts[i]);
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int g = 0; g < G; ++g) {
        const Part* pr = &parts[(b * Hkv + h) * nc];
        float m = -INFINITY;
        for (int64_t c = 0; c < nc; ++c) m = std::max(m, pr[c].m[g]);
        float l = 0.0f, w[64];
        for (int64_t c = 0; c < nc; ++c) {
          w[c] = pr[c].m[g] == -INFINITY ? 0.0f : std::exp(pr[c].m[g] - m);
          l += w[c] * pr[c].l[g];
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* dst = op + (b * H + h * G + g) * D;  // out is [B, 1, H, D] in memory
        for (int d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int64_t c = 0; c < nc; ++c) acc += w[c] * pr[c].o[g][d];
          dst[d] = acc * inv;
        }
      }
}

template <typename Layout, int D>
bool dispatch_g(int64_t G, const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& valid,
                float scale, at::Tensor& out) {
  switch (G) {
    case 1: decode_attention<Layout, 1, D>(q, kt, v, valid, scale, out); return true;
    case 2: decode_attention<Layout, 2, D>(q, kt, v, valid, scale, out); return true;
    case 3: decode_attention<Layout, 3, D>(q, kt, v, valid, scale, out); return true;
    case 4: decode_attention<Layout, 4, D>(q, kt, v, valid, scale, out); return true;
    case 5: decode_attention<Layout, 5, D>(q, kt, v, valid, scale, out); return true;
    case 6: decode_attention<Layout, 6, D>(q, kt, v, valid, scale, out); return true;
    case 7: decode_attention<Layout, 7, D>(q, kt, v, valid, scale, out); return true;
    case 8: decode_attention<Layout, 8, D>(q, kt, v, valid, scale, out); return true;
    default: return false;
  }
}

// The one-token kernel over `k` (as `Layout` keeps it) and V, into [B, 1, H, D] in memory.
template <typename Layout>
at::Tensor run_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                      double scale, int64_t L, const char* name) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), G = H / k.size(1);
  // The rows' key validity [B, L] from the [B|1, 1, 1, L] mask the KV-cache rewrite builds.
  const at::Tensor valid = mask.to(at::kBool).reshape({mask.size(0), L}).expand({B, L}).contiguous();
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, 1, H, D}, q.options()).transpose(1, 2);  // [B, T, H, D] in memory, as torch's SDPA
  const float sc = static_cast<float>(scale);
  const bool ok = D == 16   ? dispatch_g<Layout, 16>(G, qc, k, v, valid, sc, out)
                  : D == 32 ? dispatch_g<Layout, 32>(G, qc, k, v, valid, sc, out)
                  : D == 64 ? dispatch_g<Layout, 64>(G, qc, k, v, valid, sc, out)
                            : dispatch_g<Layout, 128>(G, qc, k, v, valid, sc, out);
  TORCH_CHECK(ok, name, ": unsupported group size ", G);
  return out;
}

// Shapes the kernels cover: one query token, fp32 q, head dim 16/32/64/128, 1-8 query heads per
// KV head, unit-stride rows, a bool [B|1, 1, 1, L] mask.
bool kernel_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, int64_t L) {
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t G = Hkv > 0 ? H / Hkv : 0;
  return T == 1 && q.scalar_type() == at::kFloat && (D == 16 || D == 32 || D == 64 || D == 128) && G >= 1 && G <= 8 &&
         H == G * Hkv && k.stride(3) == 1 && v.stride(3) == 1 && mask.scalar_type() == at::kBool && mask.dim() == 4 &&
         mask.size(1) == 1 && mask.size(2) == 1 && L >= 1 && L <= 64 * 128;
}

// Shapes the one-token kernels do not cover: several query tokens (prefill) take
// attention_prefill (attention_prefill_cpu.cpp) where it covers them, else torch's SDPA. Laid
// out [B, T, H, D] like the kernels' output, torch's CPU SDPA and the registered fakes: graphs
// captured around SDPA view its output that way.
at::Tensor many_tokens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                       double scale, bool bf16_dot) {
  if (prefill_shapes(q, k, v, mask)) return attention_prefill(q, k, v, mask, scale, bf16_dot);
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, q.size(1) != k.size(1))
      .transpose(1, 2)
      .contiguous()
      .transpose(1, 2);
}

}  // namespace

at::Tensor attention_bf16kv(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  const int64_t L = k_t.size(3);
  if (!(kernel_shapes(q, k_t, v, mask, L) && k_t.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16))
    // One copy: upcast straight into the row-major layout attention_prefill reads; a bf16
    // cache's prefill takes the bf16 dot products (K and V are bf16 already; q and the
    // probabilities are rounded too; 1.6x faster than fp32 products).
    return many_tokens(q, k_t.transpose(2, 3).to(q.scalar_type(), false, false, at::MemoryFormat::Contiguous),
                       v.to(q.scalar_type()), mask, scale, true);
  count_path(kAttnBf16);
  return run_kernel<Bf16DMajor>(q, k_t, v, mask, scale, L, "attention_bf16kv");
}

at::Tensor attention_f32kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           double scale, bool bf16_dot) {
  const int64_t L = k.size(2);
  if (!(kernel_shapes(q, k, v, mask, L) && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat))
    return many_tokens(q, k, v, mask, scale, bf16_dot);
  count_path(kAttnF32);
  return run_kernel<F32RowMajor>(q, k, v, mask, scale, L, "attention_f32kv");
}

// The KV-cache step's mask, once per call: key j is visible to query token t of row b when
// j <= pos[t] and valid[b, j] != 0, and always when j == pos[t] (a left-padded row's first
// token sees itself). Built by Inductor from the portable ops, it was recomputed inside every
// layer's fused kernel, serially, through Vectorized<bool>'s per-byte loops; here it is one
// buffer all layers read. SmolLM2's AOT step, both graphs in one process: 268 vs 272 ms per
// 512-token prefill, 6.98 vs 7.26 ms per decode token (docs/RESULTS.md, round 9).
at::Tensor attention_mask(const at::Tensor& valid_in, const at::Tensor& pos_in) {
  TORCH_CHECK(valid_in.dim() == 2 && pos_in.dim() == 1, "attention_mask: valid [B, L] and cache_position [T]");
  TORCH_CHECK(!valid_in.is_floating_point() && !pos_in.is_floating_point(), "attention_mask: integer inputs");
  const at::Tensor valid = valid_in.to(at::kLong).contiguous(), pos = pos_in.to(at::kLong).contiguous();
  const int64_t B = valid.size(0), L = valid.size(1), T = pos.size(0);
  at::Tensor out = at::empty({B, 1, T, L}, valid.options().dtype(at::kBool));
  const int64_t* vp = valid.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  parallel_items(B * T, B * T * L >= (1 << 16), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, p = pp[i % T];
      const int64_t* v = vp + b * L;
      uint8_t* o = op + i * L;
      for (int64_t j = 0; j < L; ++j) o[j] = static_cast<uint8_t>((j <= p && v[j] != 0) || j == p);
    }
  });
  return out;
}

}  // namespace qqq
