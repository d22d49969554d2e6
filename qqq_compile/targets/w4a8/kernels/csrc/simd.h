// Shared AVX512 helpers of the qqq CPU kernels: masked loads, per-token int8 quantization of
// one row, the activation layouts and the epilogue ((acc * s_tok) * s_ch) + bias.
//
// Everything here is inline (included by several translation units). Build flags:
// -ffp-contract=off so the epilogue rounds exactly like the torch reference.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace qqq {

constexpr int64_t KC = 128;  // k per chunk = 64 packed bytes = one zmm

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// exp(x) for x <= 0 (attention) (scores minus their max): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2.
inline __m512 exp_le0(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts (Cephes)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------- loads / stores

template <typename T>
inline __m512 load16(const T* p, __mmask16 m);
template <>
inline __m512 load16<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline __mmask16 mask16(int64_t rem) {
  return rem >= 16 ? (__mmask16)0xFFFF : rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1);
}
inline __mmask64 mask64(int64_t rem) { return rem >= 64 ? ~0ULL : rem <= 0 ? 0ULL : ((1ULL << rem) - 1); }

// GEMV weight streaming: a core keeps only ~24 L1 misses in flight, too few to reach memory
// bandwidth (SmolLM2's decode linears read 83 MB at ~17 GB/s on 2 Zen 4 cores); prefetching
// the rows kPrefetchRows ahead into L2 lets its larger miss queue run ahead. Measured on
// SmolLM2's 120 decode linears + int8 lm_head (alternating in one process, 2 threads): 24% and
// 44% less time; an L1 prefetch (_MM_HINT_T0) gained only 3-10%, 16 to 64 rows ahead did alike.
constexpr int64_t kPrefetchRows = 32;
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

template <typename T>
inline void store_out(T* p, float v) {
  p[0] = static_cast<T>(v);  // c10 conversions round to nearest even, like Tensor.to()
}

// ---------------------------------------------------------------- activation quantization

// Quantize one row of K floats: q = clamp(round(x / s), ±127), s = max(absmax, 1e-8) / 127.
// Division (not a reciprocal multiply) so q matches torch bit for bit. Writes int8 in natural
// order to `q` (K bytes); returns s and the row sum of q.
template <typename T>
inline void quant_row(const T* x, int64_t K, int8_t* q, float* s_out, int32_t* sum_out) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v = load16(x + k, mask16(K - k));
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  float amax = std::max(_mm512_reduce_max_ps(mx), 1e-8f);
  const float s = amax / 127.0f;
  const __m512 sv = _mm512_set1_ps(s);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = mask16(K - k);
    __m512 v = _mm512_div_ps(load16(x + k, m), sv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i qi = _mm512_maskz_cvtps_epi32(m, v);
    sum = _mm512_add_epi32(sum, qi);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, qi);
  }
  *s_out = s;
  *sum_out = _mm512_reduce_add_epi32(sum);
}

// Natural int8 row (K) -> permuted, zero-padded row (Kp = chunks * 128): per chunk
// [even k (64) | odd k (64)].
inline void permute_row(const int8_t* q, int64_t K, int8_t* out, int64_t Kp) {
  static const __m512i idx_even = [] {
    alignas(64) uint8_t e[64];
    for (int i = 0; i < 64; ++i) e[i] = static_cast<uint8_t>(2 * i);
    return _mm512_load_si512(e);
  }();
  static const __m512i idx_odd = _mm512_add_epi8(idx_even, _mm512_set1_epi8(1));
  for (int64_t k = 0; k < Kp; k += KC) {
    __m512i a = _mm512_maskz_loadu_epi8(mask64(K - k), q + k);
    __m512i b = K - k - 64 > 0 ? _mm512_maskz_loadu_epi8(mask64(K - k - 64), q + k + 64) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + k, _mm512_permutex2var_epi8(a, idx_even, b));
    _mm512_storeu_si512(out + k + 64, _mm512_permutex2var_epi8(a, idx_odd, b));
  }
}

inline int32_t row_sum_i8(const int8_t* q, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64)
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask64(K - k), q + k));
  return _mm512_reduce_add_epi32(acc);
}

template <typename T>
inline void quantize_impl(const T* x, int64_t M, int64_t K, int8_t* q, int64_t q_stride, bool permute,
                   float* s, int32_t* asum) {
  const int64_t Kp = ceil_div(K, KC) * KC;
  at::parallel_for(0, M, M * K >= (1 << 16) ? 1 : M, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> tmp(permute ? Kp : 0);
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* dst = permute ? tmp.data() : q + m * q_stride;
      quant_row(x + m * K, K, dst, s + m, asum + m);
      if (permute) permute_row(dst, K, q + m * q_stride, Kp);
    }
  });
}

// ---------------------------------------------------------------- tiles and epilogue

struct ActView {
  const int8_t* q;  // [M, Kp] permuted
  int64_t Kp;
  const int32_t* asum;  // [M]
  const float* s;       // [M]
};

struct Epilogue {
  const float* sch;   // [N]
  const float* bias;  // [N] or null
  void* out;          // [M, N]
  int64_t N;
  int kind;  // 0 f32, 1 bf16, 2 f16
};

inline void write_out(const Epilogue& e, int64_t m, int64_t n, int32_t acc, float xs) {
  // Same op order as the torch reference: ((acc * s_tok) * s_ch) + bias, each rounded in fp32.
  float y = static_cast<float>(acc) * xs;
  y = y * e.sch[n];
  if (e.bias) y = y + e.bias[n];
  const int64_t i = m * e.N + n;
  if (e.kind == 0)
    store_out(static_cast<float*>(e.out) + i, y);
  else if (e.kind == 1)
    store_out(static_cast<c10::BFloat16*>(e.out) + i, y);
  else
    store_out(static_cast<c10::Half*>(e.out) + i, y);
}

// AVX512-BF16 (vdpbf16ps) is not required by the extension (VNNI is): functions that use it
// are compiled with QQQ_BF16 and run only after cpu_has_bf16().
#define QQQ_BF16 __attribute__((target("avx512bf16")))

inline bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// fp32 -> bf16 bits with round-to-nearest-even and NaN -> 0x7FC0, exactly like c10::BFloat16.
inline __m256i cvt_bf16(__m512 y) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Store 16 fp32 results as out dtype: row i of the tile is lanes [i*NT, (i+1)*NT).
template <int MT, int NT>
inline void store_tile(const Epilogue& e, int64_t m0, int64_t n0, __m512 y) {
  alignas(64) uint8_t tmp[64];
  int esz = 4;
  if (e.kind == 0) {
    _mm512_store_ps(reinterpret_cast<float*>(tmp), y);
  } else {
    esz = 2;
    const __m256i h = e.kind == 1 ? cvt_bf16(y) : _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), h);
  }
  char* out = static_cast<char*>(e.out);
  for (int i = 0; i < MT; ++i)
    std::memcpy(out + ((m0 + i) * e.N + n0) * esz, tmp + i * NT * esz, static_cast<size_t>(NT * esz));
}

// Epilogue of a full 16-accumulator tile, vectorized; lane l is (token l / NT, row l % NT).
template <int MT, int NT>
inline void finish_tile(const ActView& a, const Epilogue& e, int64_t m0, int64_t n0, __m512i sums) {
  static_assert(MT * NT == 16, "one zmm of results");
  alignas(64) int32_t ti[16], tj[16];
  for (int l = 0; l < 16; ++l) {
    ti[l] = l / NT;
    tj[l] = l % NT;
  }
  const __m512i ii = _mm512_load_si512(ti), jj = _mm512_load_si512(tj);
  const __mmask16 mm = static_cast<__mmask16>((1u << MT) - 1), mn = static_cast<__mmask16>((1u << NT) - 1);
  const __m512 xs = _mm512_permutexvar_ps(ii, _mm512_maskz_loadu_ps(mm, a.s + m0));
  const __m512i corr = _mm512_slli_epi32(_mm512_permutexvar_epi32(ii, _mm512_maskz_loadu_epi32(mm, a.asum + m0)), 7);
  const __m512 sch = _mm512_permutexvar_ps(jj, _mm512_maskz_loadu_ps(mn, e.sch + n0));
  // Same op order as the torch reference: ((acc * s_tok) * s_ch) + bias, each rounded in fp32.
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums, corr)), xs), sch);
  if (e.bias) y = _mm512_add_ps(y, _mm512_permutexvar_ps(jj, _mm512_maskz_loadu_ps(mn, e.bias + n0)));
  store_tile<MT, NT>(e, m0, n0, y);
}

// Horizontal sums of 16 vectors at once: lane i of the result is sum(v[i]). About 3 ops per
// vector instead of ~8 for separate reductions, which matters when K is only a few chunks.
inline __m512i reduce16(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v0+v2, w0+w2, v1+v3, w1+w3]
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane sums of 4 vectors
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // fold the four 128-bit lanes pairwise
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// The horizontal sums of 16 vectors, lane i = sum(v[i]) (the float twin of reduce16).
inline __m512 reduce16_ps(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

inline int out_kind(at::ScalarType t) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  TORCH_CHECK(t == at::kHalf, "out_dtype must be float32, bfloat16 or float16");
  return 2;
}

}  // namespace qqq
