// Attention of several query tokens over fp32 K/V (prefill; GPTQ's calibration forwards):
// qqq::attention_prefill, called by qqq_cpu::attention_f32kv when T > 1.
//
// Why: torch's CPU flash SDPA with an explicit mask computes every (query block, key block)
// tile, and at 512 keys its key blocks are 512 long, so a causal mask saves nothing (is_causal
// measured 5% faster). A 512-token SmolLM2 prefill spent 95-120 ms of ~340 ms in it, and each
// GPTQ block's calibration forwards 1.3 s of 11. Here:
//  * work items are (batch row, KV head, 32 query tokens); the G query heads of a KV head are
//    rows of the same item, so each K/V tile is read once for all of them (GQA);
//  * keys go in tiles of 64; a tile the mask hides from all of the item's tokens is skipped
//    (a causal mask: about 56% of the tiles are computed at 512 tokens), a tile it shows to all
//    of them runs without masking;
//  * scores are broadcast FMAs against K transposed once per call ([D, L], 16 keys per zmm: no
//    horizontal sums), softmax is online (flash attention: running max and sum per row, the
//    partial output rescaled when the max grows), the weighted V sum is broadcast FMAs over V's
//    rows; all in fp32 (the exp is simd.h's degree-6 polynomial, ~2 ulp).
// A token the mask hides every key from gets zeros (torch's SDPA gives NaN there).

#include <cmath>
#include <vector>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

constexpr int64_t TQ = 32;  // query tokens per work item
constexpr int64_t TK = 64;  // keys per tile (one 64-bit mask word per token)
constexpr int R = 4;        // rows per micro-kernel call

float* aligned(std::vector<float>& buf, size_t n) {
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// s[r][0:16 NG] = sum_d qp[r][d] kt[d][0:16 NG] for R rows (qp [R, D], kt rows ldk apart);
// NG < 4 when the mask hides the tile's last keys from every token of the item.
template <int D, int NG>
inline void scores_tile(const float* qp, const float* kt, int64_t ldk, float* s) {
  __m512 acc[R][NG];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NG; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 kv[NG];
#pragma GCC unroll 4
    for (int c = 0; c < NG; ++c) kv[c] = _mm512_loadu_ps(kt + d * ldk + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(qp[r * D + d]);
#pragma GCC unroll 4
      for (int c = 0; c < NG; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NG; ++c) _mm512_store_ps(s + r * TK + 16 * c, acc[r][c]);
}

template <int D>
inline void scores_tiles(const float* qp, const float* kt, int64_t ldk, float* s, int64_t rows_p, int ng) {
  for (int64_t r = 0; r < rows_p; r += R) {
    switch (ng) {
      case 1: scores_tile<D, 1>(qp + r * D, kt, ldk, s + r * TK); break;
      case 2: scores_tile<D, 2>(qp + r * D, kt, ldk, s + r * TK); break;
      case 3: scores_tile<D, 3>(qp + r * D, kt, ldk, s + r * TK); break;
      default: scores_tile<D, 4>(qp + r * D, kt, ldk, s + r * TK); break;
    }
  }
}

// o[r] = o[r] * corr[r] + sum_{j < n} p[r][j] v[j] for R rows (o [R, D], p rows TK apart).
template <int D>
inline void pv_tile(const float* p, const float* v, int64_t ldv, int64_t n, const float* corr, float* o) {
  constexpr int C = D / 16, CB = C < 4 ? C : 4;  // R x CB accumulators per pass over the keys
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m512 acc[R][CB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c)
        acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + r * D + 16 * (c0 + c)), _mm512_set1_ps(corr[r]));
    for (int64_t j = 0; j < n; ++j) {
      __m512 vv[CB];
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c) vv[c] = _mm512_loadu_ps(v + j * ldv + 16 * (c0 + c));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 pb = _mm512_set1_ps(p[r * TK + j]);
#pragma GCC unroll 4
        for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c) _mm512_store_ps(o + r * D + 16 * (c0 + c), acc[r][c]);
  }
}

// One row's scores of a tile -> probabilities (in place), with the running max m and sum l;
// returns the factor the row's partial output is rescaled by.
inline float softmax_row(float* s, uint64_t keys, float& m, float& l) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < 4; ++c) {
    const __mmask16 k = static_cast<__mmask16>(keys >> (16 * c));
    mx = _mm512_mask_max_ps(mx, k, mx, _mm512_load_ps(s + 16 * c));
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  const float corr = m == -INFINITY ? 0.0f : std::exp(m - m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    const __mmask16 k = static_cast<__mmask16>(keys >> (16 * c));
    const __m512 e = _mm512_maskz_mov_ps(k, exp_le0(_mm512_sub_ps(_mm512_load_ps(s + 16 * c), _mm512_set1_ps(m_new))));
    _mm512_store_ps(s + 16 * c, e);
    sum = _mm512_add_ps(sum, e);
  }
  m = m_new;
  l = l * corr + _mm512_reduce_add_ps(sum);
  return corr;
}

struct Args {
  const float* q;
  int64_t qs0, qs1, qs2;  // q [B, H, T, D]
  const float* kt;        // K transposed: [B * Hkv, D, Lp]
  int64_t lp;
  const float* v;
  int64_t vs0, vs1, vs2;  // v [B, Hkv, L, D]
  const uint8_t* mask;    // [B, T, L]
  float* out;             // [B, T, H, D]
  int64_t B, H, Hkv, T, L;
  float scale;
};

template <int D>
void attend_item(const Args& a, int64_t G, int64_t b, int64_t hk, int64_t t0) {
  const int64_t nt = std::min(TQ, a.T - t0), rows = G * nt, rows_p = ceil_div(rows, R) * R;
  thread_local std::vector<float> qbuf, obuf, sbuf, mlbuf;
  float* qp = aligned(qbuf, rows_p * D);
  float* o = aligned(obuf, rows_p * D);
  float* s = aligned(sbuf, rows_p * TK);
  float* ml = aligned(mlbuf, 3 * rows_p);
  float *m = ml, *l = ml + rows_p, *corr = ml + 2 * rows_p;
  // Rows g-major (row r: head hk * G + r / nt, token t0 + r % nt); padding rows repeat the last.
  for (int64_t r = 0; r < rows_p; ++r) {
    const int64_t rr = std::min(r, rows - 1), g = rr / nt, t = t0 + rr % nt;
    const float* src = a.q + b * a.qs0 + (hk * G + g) * a.qs1 + t * a.qs2;
    for (int d = 0; d < D; ++d) qp[r * D + d] = src[d] * a.scale;
    std::fill(o + r * D, o + (r + 1) * D, 0.0f);
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const float* kt = a.kt + (b * a.Hkv + hk) * D * a.lp;
  const float* v = a.v + b * a.vs0 + hk * a.vs1;
  uint64_t tok_keys[TQ];
  for (int64_t j0 = 0; j0 < a.L; j0 += TK) {
    const int64_t n = std::min(TK, a.L - j0);
    const uint64_t full = static_cast<uint64_t>(mask64(n));
    uint64_t any = 0, all = full;
    for (int64_t tt = 0; tt < nt; ++tt) {
      const __m512i mv = _mm512_maskz_loadu_epi8(mask64(n), a.mask + (b * a.T + t0 + tt) * a.L + j0);
      tok_keys[tt] = static_cast<uint64_t>(_mm512_test_epi8_mask(mv, mv));
      any |= tok_keys[tt];
      all &= tok_keys[tt];
    }
    if (!any) continue;  // the mask hides this tile from every token of the item
    // Keys past the last one any token sees are left out (causal: the diagonal tile's second
    // half for the item's first 32 tokens): their scores are never read (softmax masks them)
    // and their probabilities would be zero.
    const int64_t n_seen = 64 - __builtin_clzll(any);
    scores_tiles<D>(qp, kt + j0, a.lp, s, rows_p, static_cast<int>(ceil_div(n_seen, 16)));
    for (int64_t r = 0; r < rows_p; ++r) {
      const uint64_t keys = all == full ? full : tok_keys[std::min(r, rows - 1) % nt];
      if (!keys) {  // no key of this tile for this row: nothing to add
        std::fill(s + r * TK, s + (r + 1) * TK, 0.0f);
        corr[r] = 1.0f;
        continue;
      }
      corr[r] = softmax_row(s + r * TK, keys, m[r], l[r]);
    }
    for (int64_t r = 0; r < rows_p; r += R) pv_tile<D>(s + r * TK, v + j0 * a.vs2, a.vs2, n_seen, corr + r, o + r * D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / nt, t = t0 + r % nt;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    float* dst = a.out + ((b * a.T + t) * a.H + hk * G + g) * D;
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_load_ps(o + r * D + d), _mm512_set1_ps(inv)));
  }
}

template <int D>
void run(const Args& a) {
  const int64_t G = a.H / a.Hkv, nq = ceil_div(a.T, TQ), items = a.B * a.Hkv * nq;
  parallel_items(items, items > 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) attend_item<D>(a, G, i / (a.Hkv * nq), i / nq % a.Hkv, i % nq * TQ);
  });
}

}  // namespace

bool prefill_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || mask.dim() != 4) return false;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  const bool dims = (D == 16 || D == 32 || D == 64 || D == 128) && Hkv >= 1 && H % Hkv == 0 && H / Hkv <= 8 &&
                    T >= 1 && L >= 1 && k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes();
  const bool types = q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                     mask.scalar_type() == at::kBool;
  const bool strides = q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
  const bool bcast = (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == 1 &&
                     (mask.size(2) == 1 || mask.size(2) == T) && mask.size(3) == L;
  return dims && types && strides && bcast;
}

at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                             double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  const int64_t lp = ceil_div(L, TK) * TK;
  // K transposed once per call ([B * Hkv, D, Lp], zero past L): every item's score tiles then
  // read 16 keys per load.
  at::Tensor kt = at::empty({B * Hkv, D, lp}, q.options());
  float* ktp = kt.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  parallel_items(B * Hkv, B * Hkv > 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* src = kp + i / Hkv * k.stride(0) + i % Hkv * k.stride(1);
      float* dst = ktp + i * D * lp;
      for (int64_t j = 0; j < L; ++j)
        for (int64_t d = 0; d < D; ++d) dst[d * lp + j] = src[j * k.stride(2) + d];
      for (int64_t d = 0; d < D; ++d) std::fill(dst + d * lp + L, dst + (d + 1) * lp, 0.0f);
    }
  });
  const at::Tensor m = mask.expand({B, 1, T, L}).reshape({B, T, L}).contiguous();
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  const Args a{q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), ktp, lp,
               v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2),
               reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), out.data_ptr<float>(),
               B, H, Hkv, T, L, static_cast<float>(scale)};
  count_path(kAttnPrefill);
  switch (D) {
    case 16: run<16>(a); break;
    case 32: run<32>(a); break;
    case 64: run<64>(a); break;
    default: run<128>(a); break;
  }
  return out.transpose(1, 2);  // [B, H, T, D], laid out [B, T, H, D] as torch's CPU SDPA
}

}  // namespace qqq
