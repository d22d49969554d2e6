// GPTQ's Hessian sums from a bf16 chunk with fp32 accumulation (compiler/gptq_solve.py:
// HessianAccumulator._flush): H += XᵀX over the column slabs' upper part, and GPTAQ's
// D += ΔXᵀX, for a chunk a = [X | ΔX] (bf16 [M, K or 2K], row-major, the staging buffer).
//
// Why: CPU torch has no bf16 GEMM with an fp32 result, so the torch path rounds each chunk's
// product to bf16 and, to keep that rounding small, subtracts an expectation first; at
// Qwen2.5-0.5B's down_proj (K = 4864) those extra passes over the K x K sums cost a third of
// the GEMM. Here vdpbf16ps multiplies bf16 pairs into fp32 accumulators that stay in
// registers over up to 1,024 rows (KP pairs) before they are added to the sums: no bf16
// rounding of any product or sum, no extra passes.
//
// Layout: the chunk is first packed in 16-column tiles of row pairs, tile c holds
// [pair p][column 16c + i][row 2p, row 2p + 1] (64 bytes per pair), so a tile's pairs are one
// contiguous stream and one zmm holds 16 columns' pairs (what vdpbf16ps multiplies). The
// micro kernel keeps an 8 x 32 block of the sums in 16 zmm accumulators: per pair it loads
// two tiles of the j side and broadcasts 8 of the i side. Loop order: pair blocks (the sums
// in registers over KP pairs), then i blocks of MB columns (their packed pairs stay in L2),
// then the j tiles split across threads.

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

constexpr int64_t KP = 512;  // row pairs per pass (the sums stay in registers over them)
constexpr int64_t MB = 256;  // i columns per block: 256 x 512 pairs x 4 bytes = 512 KiB (L2)

// C[r, 16t + l] += sum_p A[p, r] B_t[p, l] for r < 8, t < NT; a points at the i side's tile at
// pair 0 and column offset (0 or 8), b at the j side's first tile; tiles are ts words apart.
template <int NT>
QQQ_BF16 void micro(const uint32_t* a, const uint32_t* b, int64_t ts, int64_t np, float* c, int64_t ldc) {
  __m512 acc[8][NT];
  for (int r = 0; r < 8; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    __m512i bv[NT];
    for (int t = 0; t < NT; ++t) bv[t] = _mm512_loadu_si512(b + t * ts + p * 16);
    const uint32_t* ap = a + p * 16;
    for (int r = 0; r < 8; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(ap[r]));
      for (int t = 0; t < NT; ++t)
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], reinterpret_cast<const __m512bh&>(av),
                                     reinterpret_cast<const __m512bh&>(bv[t]));
    }
  }
  for (int r = 0; r < 8; ++r)
    for (int t = 0; t < NT; ++t) {
      float* cp = c + r * ldc + t * 16;
      _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), acc[r][t]));
    }
}

// Pack rows [0, M) of a (bf16 [M, W], row stride lda) into tiles: out[(tile * P + p) * 16 + l]
// holds (a[2p, 16 tile + l], a[2p + 1, 16 tile + l]) as one 32-bit word; a missing last row
// and columns past W are zeros.
void pack_pairs(const uint16_t* a, int64_t lda, int64_t M, int64_t W, int64_t P, uint32_t* out) {
  const int64_t tiles = ceil_div(W, 16);
  // Interleave two rows' 16 values: word l = (lo[l], hi[l]).
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t * 16;
      const __mmask16 mk = mask16(W - c);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t r0 = 2 * p, r1 = r0 + 1;
        const __m256i lo = _mm256_maskz_loadu_epi16(mk, a + r0 * lda + c);
        const __m256i hi = r1 < M ? _mm256_maskz_loadu_epi16(mk, a + r1 * lda + c) : _mm256_setzero_si256();
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        _mm512_storeu_si512(out + (t * P + p) * 16, _mm512_permutexvar_epi16(idx, v));
      }
    }
  });
}

// pack_pairs with a's columns read through idx (column c of the chunk is a[:, idx[c]]): the
// deferred D's chunks, in the solve's column order, without a gathered copy (a torch gather
// of a 2048 x 9728 chunk took 72 ms, most of the deferred D's saving at K = 4864).
void pack_pairs_gather(const uint16_t* a, int64_t lda, int64_t M, int64_t W, int64_t P, const int64_t* idx,
                       uint32_t* out) {
  const int64_t tiles = ceil_div(W, 16);
  // By row pairs, all tiles of a pair at once: its two rows stay in L1/L2 while they are read
  // in the gathered order (by tiles, every pair's read of 16 scattered columns missed cache).
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    alignas(64) uint32_t words[16];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = 2 * p, r1 = r0 + 1;
      const uint16_t* lo = a + r0 * lda;
      const uint16_t* hi = r1 < M ? a + r1 * lda : nullptr;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t c = t * 16, n = std::min<int64_t>(16, W - c);
        for (int64_t l = 0; l < 16; ++l) {
          const int64_t col = l < n ? idx[c + l] : -1;
          const uint32_t w0 = col >= 0 ? lo[col] : 0, w1 = col >= 0 && hi ? hi[col] : 0;
          words[l] = w0 | (w1 << 16);
        }
        _mm512_storeu_si512(out + (t * P + p) * 16, _mm512_load_si512(words));
      }
    }
  });
}

}  // namespace

void hessian_gemm(const at::Tensor& sums, const at::Tensor& a, const at::Tensor& packed, int64_t k, int64_t slab,
                  bool h, bool d_upper, const c10::optional<at::Tensor>& cols) {
  TORCH_CHECK(cpu_has_bf16(), "hessian_gemm: this CPU lacks AVX512-BF16");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && a.dim() == 2 && a.stride(1) == 1,
              "hessian_gemm: a must be bf16 [M, K or 2K] with unit column stride");
  const int64_t M = a.size(0), W = a.size(1);
  TORCH_CHECK(k > 0 && k % 16 == 0 && (W == k || W == 2 * k), "hessian_gemm: K must be a multiple of 16 and a [M, K or 2K]");
  const bool with_d = W == 2 * k;
  TORCH_CHECK(h || with_d, "hessian_gemm: h = false needs a [M, 2K] chunk (D only)");
  TORCH_CHECK(sums.scalar_type() == at::kFloat && sums.dim() == 2 && sums.size(1) == k && sums.is_contiguous() &&
                  sums.size(0) >= (with_d ? 2 * k : k),
              "hessian_gemm: sums must be contiguous float32 [K or 2K, K] ([H; D])");
  // A work item's 32 columns must lie in one slab.
  TORCH_CHECK(slab > 0 && (slab % 32 == 0 || slab >= k), "hessian_gemm: slab must be a multiple of 32, or at least K");
  const int64_t P = ceil_div(M, 2), tiles = ceil_div(W, 16);
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.is_contiguous() && packed.numel() >= tiles * P * 16,
              "hessian_gemm: packed must be a contiguous int32 buffer of at least ", tiles * P * 16, " words");
  if (M == 0) return;
  uint32_t* pk = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const uint16_t* ap16 = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  if (cols.has_value()) {
    TORCH_CHECK(cols->scalar_type() == at::kLong && cols->dim() == 1 && cols->size(0) == W && cols->is_contiguous(),
                "hessian_gemm: cols must be int64 [W], a's column for each column of the chunk");
    const int64_t* ip = cols->data_ptr<int64_t>();
    for (int64_t c = 0; c < W; ++c)
      TORCH_CHECK(ip[c] >= 0 && ip[c] < W, "hessian_gemm: cols[", c, "] = ", ip[c], " is outside a's ", W, " columns");
    pack_pairs_gather(ap16, a.stride(0), M, W, P, ip, pk);
  } else {
    pack_pairs(ap16, a.stride(0), M, W, P, pk);
  }
  float* c = sums.data_ptr<float>();
  const int64_t jt = k / 16;  // j tiles (the X columns)
  // Work items: pairs of j tiles (32 columns; a last single tile when jt is odd).
  const int64_t items = ceil_div(jt, 2);
  for (int64_t p0 = 0; p0 < P; p0 += KP) {
    const int64_t np = std::min(KP, P - p0);
    // i blocks: H's rows [0, K), then D's rows [K, 2K) reading the ΔX tiles.
    for (int64_t part = h ? 0 : 1; part < (with_d ? 2 : 1); ++part) {
      const bool upper = part == 0 || d_upper;
      for (int64_t i0 = 0; i0 < k; i0 += MB) {
        const int64_t i1 = std::min(k, i0 + MB);
        parallel_items(items, true, [&](int64_t s0, int64_t s1) {
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t j0 = s * 32, nt = std::min<int64_t>(2, jt - 2 * s);
            // H: a column slab's rows down to the slab's end only (result() mirrors the rest).
            const int64_t rows_end = upper ? std::min(k, (j0 / slab + 1) * slab) : k;
            const int64_t r1 = std::min(i1, rows_end);
            const uint32_t* b = pk + (j0 / 16) * P * 16 + p0 * 16;
            for (int64_t i = i0; i < r1; i += 8) {
              const int64_t col = part * k + i;  // the i side's column in a
              const uint32_t* ap = pk + (col / 16) * P * 16 + p0 * 16 + (col % 16);
              float* cp = c + (part * k + i) * k + j0;
              if (nt == 2)
                micro<2>(ap, b, P * 16, np, cp, k);
              else
                micro<1>(ap, b, P * 16, np, cp, k);
            }
          }
        });
      }
    }
  }
  count_path(kHessianGemm);
}

}  // namespace qqq
