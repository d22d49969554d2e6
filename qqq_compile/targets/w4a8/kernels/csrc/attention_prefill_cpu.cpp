// Attention of several query tokens over fp32 K/V (prefill; GPTQ's calibration forwards):
// qqq::attention_prefill, called by qqq_cpu::attention_f32kv when T > 1.
//
// Why: torch's CPU flash SDPA with an explicit mask computes every (query block, key block)
// tile, and at 512 keys its key blocks are 512 long, so a causal mask saves nothing (is_causal
// measured 5% faster). A 512-token SmolLM2 prefill spent 95-120 ms of ~340 ms in it, and each
// GPTQ block's calibration forwards 1.3 s of 11. Here:
//  * work items are (batch row, KV head, 32 query tokens); the G query heads of a KV head are
//    rows of the same item, so each K/V tile is read once for all of them (GQA);
//  * keys go in tiles of 64 from each row's first key (its origin: a row at later slots is
//    tiled, and rounded, as it is alone); a tile the mask hides from all of the item's tokens is skipped
//    (a causal mask: about 56% of the tiles are computed at 512 tokens), a tile it shows to all
//    of them runs without masking;
//  * scores are broadcast FMAs against K transposed once per call ([D, L], 16 keys per zmm: no
//    horizontal sums), softmax is online (flash attention: running max and sum per row, the
//    partial output rescaled when the max grows), the weighted V sum is broadcast FMAs over V's
//    rows; all in fp32 (the exp is simd.h's degree-6 polynomial, ~2 ulp).
//  * bf16_dot (the KV-cache step's prefill, on CPUs with AVX512-BF16): the two products take
//    bf16 inputs with fp32 sums (vdpbf16ps: two products per fp32 lane, twice the FMA's rate;
//    1.93 -> 1.17 ms per SmolLM2 layer at 512 tokens), the precision of a bf16 model's
//    attention on a GPU: Q, K, V and the probabilities are rounded to bf16 (2^-9 relative),
//    the softmax stays fp32. K and V are laid out once per call as bf16 pairs (K: two dims of
//    one key per 32-bit word; V: one dim of two keys). GPTQ's calibration forwards keep fp32
//    products. The step gives each row its own positions (kv_cache.py), so with the tiles
//    from the origin a serving row's q/k and sums are bit for bit those of a lone generate():
//    before, RoPE at its shifted positions differed by float rounding, which bf16 rounding
//    turned into different greedy tokens.
// A token the mask hides every key from gets zeros (torch's SDPA gives NaN there).

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

constexpr int64_t TQ = 32;  // query tokens per work item
constexpr int64_t TK = 64;  // keys per tile (one 64-bit mask word per token)
constexpr int R = 4;        // rows per micro-kernel call

template <class T>
T* aligned(std::vector<T>& buf, size_t n) {
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// The R x N block of accumulators the micro-kernels below share: zeroed, or loaded from rows
// ld apart and scaled per row; stored back.
template <int N>
inline void acc_zero(__m512 (&acc)[R][N]) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < N; ++c) acc[r][c] = _mm512_setzero_ps();
}

template <int N>
inline void acc_load_scaled(__m512 (&acc)[R][N], const float* src, int64_t ld, const float* scale) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < N; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(src + r * ld + 16 * c), _mm512_set1_ps(scale[r]));
}

template <int N>
inline void acc_store(const __m512 (&acc)[R][N], float* dst, int64_t ld) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < N; ++c) _mm512_store_ps(dst + r * ld + 16 * c, acc[r][c]);
}

// Only the QQQ_BF16 functions below use AVX512-BF16 instructions (simd.h).

// The bf16 layouts hold two bf16 per 32-bit word, the first in the low half (what
// vdpbf16ps multiplies pairwise).
// dst[0 : n/2] = bf16(src[0 : n] * scale), n a multiple of 16.
QQQ_BF16 void to_bf16_words(const float* src, float scale, int64_t n, uint32_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_set1_ps(scale)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i / 2), reinterpret_cast<const __m256i&>(b));
  }
}

// K [L, D] (rows ld apart) -> [D/2, lp] words: word (p, j) = (k[j][2p], k[j][2p + 1]); zero past L.
QQQ_BF16 void k_pairs(const float* k, int64_t ld, int64_t L, int64_t lp, int64_t D, uint32_t* dst) {
  alignas(64) uint32_t w[64];
  for (int64_t j = 0; j < L; ++j) {
    to_bf16_words(k + j * ld, 1.0f, D, w);
    for (int64_t p = 0; p < D / 2; ++p) dst[p * lp + j] = w[p];
  }
  for (int64_t p = 0; p < D / 2; ++p) std::fill(dst + p * lp + L, dst + (p + 1) * lp, 0u);
}

// V [L, D] (rows ld apart) -> [lp/2, D] words: word (jj, d) = (v[2jj][d], v[2jj + 1][d]); zero past L.
QQQ_BF16 void v_pairs(const float* v, int64_t ld, int64_t L, int64_t lp, int64_t D, uint32_t* dst) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t jj = 0; jj < lp / 2; ++jj) {
    const int64_t j = 2 * jj;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 a = j < L ? _mm512_loadu_ps(v + j * ld + d) : _mm512_setzero_ps();
      const __m512 b = j + 1 < L ? _mm512_loadu_ps(v + (j + 1) * ld + d) : _mm512_setzero_ps();
      const __m512bh ab = _mm512_cvtne2ps_pbh(b, a);  // a in words 0-15, b in 16-31
      _mm512_storeu_si512(dst + jj * D + d, _mm512_permutexvar_epi16(idx, reinterpret_cast<const __m512i&>(ab)));
    }
  }
}

// The bf16 counterpart of scores_tile: q2 [R, D/2] words, kt2 [D/2, ldk] words.
template <int D, int NG>
QQQ_BF16 void scores_tile_bf16(const uint32_t* q2, const uint32_t* kt2, int64_t ldk, float* s) {
  __m512 acc[R][NG];
  acc_zero(acc);
  for (int p = 0; p < D / 2; ++p) {
    __m512i kv[NG];
#pragma GCC unroll 4
    for (int c = 0; c < NG; ++c) kv[c] = _mm512_loadu_si512(kt2 + p * ldk + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i qb = _mm512_set1_epi32(static_cast<int>(q2[r * (D / 2) + p]));
#pragma GCC unroll 4
      for (int c = 0; c < NG; ++c)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], reinterpret_cast<const __m512bh&>(qb),
                                     reinterpret_cast<const __m512bh&>(kv[c]));
    }
  }
  acc_store(acc, s, TK);
}

// The bf16 counterpart of pv_tile: the rows' probabilities s (fp32, rows TK apart) rounded
// to bf16 pairs, then o[r] = o[r] * corr[r] + sum over the first n keys (v2 [pairs, D] words).
// For an odd n the last pair's second key is masked out of V, not only out of p: the fp32
// kernel never reads key n either (a key no token sees may hold anything, NaN included).
template <int D>
QQQ_BF16 void pv_tile_bf16(const float* s, const uint32_t* v2, int64_t n, const float* corr, float* o) {
  const int64_t npairs = ceil_div(n, 2);
  const __mmask32 last = n % 2 ? 0x55555555u : 0xFFFFFFFFu;  // the even key of each word
  constexpr int C = D / 16, CB = C < 4 ? C : 4;
  alignas(64) uint32_t p2[R][TK / 2];
  for (int r = 0; r < R; ++r) to_bf16_words(s + r * TK, 1.0f, TK, p2[r]);  // softmax wrote all TK
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m512 acc[R][CB];
    acc_load_scaled(acc, o + 16 * c0, D, corr);
    for (int64_t jj = 0; jj < npairs; ++jj) {
      __m512i vv[CB];
      const __mmask32 keep = jj == npairs - 1 ? last : 0xFFFFFFFFu;
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c) vv[c] = _mm512_maskz_loadu_epi16(keep, v2 + jj * D + 16 * (c0 + c));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i pb = _mm512_set1_epi32(static_cast<int>(p2[r][jj]));
#pragma GCC unroll 4
        for (int c = 0; c < CB; ++c)
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], reinterpret_cast<const __m512bh&>(pb),
                                       reinterpret_cast<const __m512bh&>(vv[c]));
      }
    }
    acc_store(acc, o + 16 * c0, D);
  }
}

// s[r][0:16 NG] = sum_d qp[r][d] kt[d][0:16 NG] for R rows (qp [R, D], kt rows ldk apart);
// NG < 4 when the mask hides the tile's last keys from every token of the item.
template <int D, int NG>
inline void scores_tile(const float* qp, const float* kt, int64_t ldk, float* s) {
  __m512 acc[R][NG];
  acc_zero(acc);
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
  acc_store(acc, s, TK);
}

template <int D, bool BF, int NG, class T>
inline void scores_tile_of(const T* q, const T* kt, int64_t ldk, float* s) {
  if constexpr (BF)
    scores_tile_bf16<D, NG>(q, kt, ldk, s);
  else
    scores_tile<D, NG>(q, kt, ldk, s);
}

template <int D, bool BF, class T>
inline void scores_tiles(const T* qp, const T* kt, int64_t ldk, float* s, int64_t rows_p, int ng) {
  constexpr int64_t QW = BF ? D / 2 : D;  // q's row length in elements of T
  for (int64_t r = 0; r < rows_p; r += R) {
    switch (ng) {
      case 1: scores_tile_of<D, BF, 1>(qp + r * QW, kt, ldk, s + r * TK); break;
      case 2: scores_tile_of<D, BF, 2>(qp + r * QW, kt, ldk, s + r * TK); break;
      case 3: scores_tile_of<D, BF, 3>(qp + r * QW, kt, ldk, s + r * TK); break;
      default: scores_tile_of<D, BF, 4>(qp + r * QW, kt, ldk, s + r * TK); break;
    }
  }
}

// o[r] = o[r] * corr[r] + sum_{j < n} p[r][j] v[j] for R rows (o [R, D], p rows TK apart).
template <int D>
inline void pv_tile(const float* p, const float* v, int64_t ldv, int64_t n, const float* corr, float* o) {
  constexpr int C = D / 16, CB = C < 4 ? C : 4;  // R x CB accumulators per pass over the keys
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m512 acc[R][CB];
    acc_load_scaled(acc, o + 16 * c0, D, corr);
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
    acc_store(acc, o + 16 * c0, D);
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
  const uint32_t* kt2;    // bf16_dot: K as [B * Hkv, D/2, Lp] words (k_pairs)
  const uint32_t* v2;     // bf16_dot: V as [B * Hkv, Lp/2, D] words (v_pairs)
  int64_t lp;
  const float* v;
  int64_t vs0, vs1, vs2;  // v [B, Hkv, L, D]
  const uint8_t* mask;    // [B, T, L]
  const int64_t* origin;  // [B]: each row's first key any of its tokens sees (its tiles start there)
  float* out;             // [B, T, H, D]
  int64_t B, H, Hkv, T, L;
  float scale;
};

template <int D, bool BF>
void attend_item(const Args& a, int64_t G, int64_t b, int64_t hk, int64_t t0) {
  using T = std::conditional_t<BF, uint32_t, float>;  // q and K: fp32, or bf16 pairs
  constexpr int64_t QW = BF ? D / 2 : D;
  const int64_t nt = std::min(TQ, a.T - t0), rows = G * nt, rows_p = ceil_div(rows, R) * R;
  thread_local std::vector<T> qbuf;
  thread_local std::vector<float> obuf, sbuf, mlbuf;
  T* qp = aligned(qbuf, rows_p * QW);
  float* o = aligned(obuf, rows_p * D);
  float* s = aligned(sbuf, rows_p * TK);
  float* ml = aligned(mlbuf, 3 * rows_p);
  float *m = ml, *l = ml + rows_p, *corr = ml + 2 * rows_p;
  // Rows g-major (row r: head hk * G + r / nt, token t0 + r % nt); padding rows repeat the last.
  for (int64_t r = 0; r < rows_p; ++r) {
    const int64_t rr = std::min(r, rows - 1), g = rr / nt, t = t0 + rr % nt;
    const float* src = a.q + b * a.qs0 + (hk * G + g) * a.qs1 + t * a.qs2;
    if constexpr (BF)
      to_bf16_words(src, a.scale, D, qp + r * QW);
    else
      for (int d = 0; d < D; ++d) qp[r * D + d] = src[d] * a.scale;
    std::fill(o + r * D, o + (r + 1) * D, 0.0f);
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  // Key tiles start at the row's first visible key: a row placed after others' slots (left
  // padding, a server's joining request) is then tiled, and rounded, as it is alone.
  const int64_t org = a.origin[b], len = a.L - org;
  const T* kt;
  if constexpr (BF)
    kt = a.kt2 + (b * a.Hkv + hk) * (D / 2) * a.lp;
  else
    kt = a.kt + (b * a.Hkv + hk) * D * a.lp;
  const float* v = a.v + b * a.vs0 + hk * a.vs1 + org * a.vs2;
  const uint32_t* v2 = BF ? a.v2 + (b * a.Hkv + hk) * (a.lp / 2) * D : nullptr;
  uint64_t tok_keys[TQ];
  for (int64_t j0 = 0; j0 < len; j0 += TK) {
    const int64_t n = std::min(TK, len - j0);
    const uint64_t full = static_cast<uint64_t>(mask64(n));
    uint64_t any = 0, all = full;
    for (int64_t tt = 0; tt < nt; ++tt) {
      const __m512i mv = _mm512_maskz_loadu_epi8(mask64(n), a.mask + (b * a.T + t0 + tt) * a.L + org + j0);
      tok_keys[tt] = static_cast<uint64_t>(_mm512_test_epi8_mask(mv, mv));
      any |= tok_keys[tt];
      all &= tok_keys[tt];
    }
    if (!any) continue;  // the mask hides this tile from every token of the item
    // Keys past the last one any token sees are left out (causal: the diagonal tile's second
    // half for the item's first 32 tokens): their scores are never read (softmax masks them)
    // and their probabilities would be zero.
    const int64_t n_seen = 64 - __builtin_clzll(any);
    scores_tiles<D, BF>(qp, kt + j0, a.lp, s, rows_p, static_cast<int>(ceil_div(n_seen, 16)));
    for (int64_t r = 0; r < rows_p; ++r) {
      const uint64_t keys = all == full ? full : tok_keys[std::min(r, rows - 1) % nt];
      if (!keys) {  // no key of this tile for this row: nothing to add
        std::fill(s + r * TK, s + (r + 1) * TK, 0.0f);
        corr[r] = 1.0f;
        continue;
      }
      corr[r] = softmax_row(s + r * TK, keys, m[r], l[r]);
    }
    for (int64_t r = 0; r < rows_p; r += R) {
      if constexpr (BF)
        pv_tile_bf16<D>(s + r * TK, v2 + j0 / 2 * D, n_seen, corr + r, o + r * D);
      else
        pv_tile<D>(s + r * TK, v + j0 * a.vs2, a.vs2, n_seen, corr + r, o + r * D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / nt, t = t0 + r % nt;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    float* dst = a.out + ((b * a.T + t) * a.H + hk * G + g) * D;
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_load_ps(o + r * D + d), _mm512_set1_ps(inv)));
  }
}

template <int D, bool BF>
void run(const Args& a) {
  const int64_t G = a.H / a.Hkv, nq = ceil_div(a.T, TQ), items = a.B * a.Hkv * nq;
  parallel_items(items, items > 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) attend_item<D, BF>(a, G, i / (a.Hkv * nq), i / nq % a.Hkv, i % nq * TQ);
  });
}

template <bool BF>
void run_d(const Args& a, int64_t D) {
  switch (D) {
    case 16: run<16, BF>(a); break;
    case 32: run<32, BF>(a); break;
    case 64: run<64, BF>(a); break;
    default: run<128, BF>(a); break;
  }
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
                             double scale, bool bf16_dot) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  const int64_t lp = ceil_div(L, TK) * TK;
  const bool bf = bf16_dot && cpu_has_bf16();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  // Each row's origin: the first key seen by any of its tokens that see two keys or more
  // (else by any token); its K/V layouts and key tiles start there. A token that sees one key
  // only (a left-padding token sees its own slot) gets that key's V exactly, as the tiles
  // would give it, and does not move the origin: a row left-padded in a batch is then tiled
  // as it is alone.
  const at::Tensor m = mask.expand({B, 1, T, L}).reshape({B, T, L}).contiguous();
  const auto* mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  std::vector<int64_t> origin(B, L), first(B * T, -1);  // first: a one-key token's key
  for (int64_t b = 0; b < B; ++b) {
    int64_t any_first = L;
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* row = mp + (b * T + t) * L;
      const uint8_t* f = static_cast<const uint8_t*>(std::memchr(row, 1, L));
      if (f == nullptr) continue;
      const int64_t j = f - row;
      any_first = std::min(any_first, j);
      if (j + 1 < L && std::memchr(row + j + 1, 1, L - j - 1) != nullptr)
        origin[b] = std::min(origin[b], j);
      else
        first[b * T + t] = j;
    }
    if (origin[b] == L) origin[b] = any_first;
  }
  at::Tensor kt, kt2, v2;
  if (bf) {
    // K and V as bf16 pairs once per call (k_pairs, v_pairs), from the row's origin.
    kt2 = at::empty({B * Hkv, D / 2, lp}, q.options().dtype(at::kInt));
    v2 = at::empty({B * Hkv, lp / 2, D}, q.options().dtype(at::kInt));
    auto* k2p = reinterpret_cast<uint32_t*>(kt2.data_ptr<int32_t>());
    auto* v2p = reinterpret_cast<uint32_t*>(v2.data_ptr<int32_t>());
    parallel_items(B * Hkv, B * Hkv > 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t org = origin[i / Hkv];
        k_pairs(kp + i / Hkv * k.stride(0) + i % Hkv * k.stride(1) + org * k.stride(2), k.stride(2), L - org, lp, D,
                k2p + i * (D / 2) * lp);
        v_pairs(vp + i / Hkv * v.stride(0) + i % Hkv * v.stride(1) + org * v.stride(2), v.stride(2), L - org, lp, D,
                v2p + i * (lp / 2) * D);
      }
    });
  } else {
    // K transposed once per call ([B * Hkv, D, Lp], from the row's origin, zero past L): every
    // item's score tiles then read 16 keys per load.
    kt = at::empty({B * Hkv, D, lp}, q.options());
    float* ktp = kt.data_ptr<float>();
    parallel_items(B * Hkv, B * Hkv > 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t org = origin[i / Hkv], len = L - org;
        const float* src = kp + i / Hkv * k.stride(0) + i % Hkv * k.stride(1) + org * k.stride(2);
        float* dst = ktp + i * D * lp;
        for (int64_t j = 0; j < len; ++j)
          for (int64_t d = 0; d < D; ++d) dst[d * lp + j] = src[j * k.stride(2) + d];
        for (int64_t d = 0; d < D; ++d) std::fill(dst + d * lp + len, dst + (d + 1) * lp, 0.0f);
      }
    });
  }
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  const Args a{q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2),
               bf ? nullptr : kt.data_ptr<float>(),
               bf ? reinterpret_cast<const uint32_t*>(kt2.data_ptr<int32_t>()) : nullptr,
               bf ? reinterpret_cast<const uint32_t*>(v2.data_ptr<int32_t>()) : nullptr,
               lp, vp, v.stride(0), v.stride(1), v.stride(2),
               mp, origin.data(), out.data_ptr<float>(),
               B, H, Hkv, T, L, static_cast<float>(scale)};
  count_path(bf ? kAttnPrefillBf16 : kAttnPrefill);
  if (bf)
    run_d<true>(a, D);
  else
    run_d<false>(a, D);
  // One-key tokens whose key lies before the origin: the tiles left them at zero.
  float* op = out.data_ptr<float>();
  const int64_t G = H / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t j = first[b * T + t];
      if (j < 0 || j >= origin[b]) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float* src = vp + b * v.stride(0) + h / G * v.stride(1) + j * v.stride(2);
        float* dst = op + ((b * T + t) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = bf ? static_cast<float>(c10::BFloat16(src[d])) : src[d];  // what p = 1 times V gives
      }
    }
  return out.transpose(1, 2);  // [B, H, T, D], laid out [B, T, H, D] as torch's CPU SDPA
}

}  // namespace qqq
