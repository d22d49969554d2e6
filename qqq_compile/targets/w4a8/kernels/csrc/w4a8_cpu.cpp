// W4A8 (QQQ) CPU kernels: AVX512-VNNI GEMV/GEMM that reads packed int4 weights directly.
//
// Format (see qqq_compile/formats.py): qweight uint8 [N, ceil(K/2)], even k in the low
// nibble; W8 = q4 << 4 (per-channel), q4 * gs (int8 groups) or clamp(round(q4 * gs), ±127)
// (fp16 groups). Activations are per-token symmetric int8.
//
// Trick: VNNI's vpdpbusd multiplies u8 x s8. We make the *weight* the unsigned operand:
// every format is turned, per 16-entry nibble lookup table (vpshufb), into u8 = W8 + 128,
// so acc = sum_k (W8 + 128) * a_k = exact - 128 * sum_k a_k. The correction depends only on
// the token, so no weight-dependent precomputation (row sums) is needed. Wrap-around int32
// arithmetic keeps this exact whenever the true result fits in int32.
//
// The even/odd nibble interleave is handled by permuting activations once per call: each
// 128-wide k chunk is stored as [64 even k | 64 odd k], so the low nibbles of 64 packed
// bytes line up with the first half and the high nibbles with the second.
//
// Group sizes that are not a multiple of 32 (a 128-bit LUT lane covers 32 consecutive k) take
// a scalar unpack to W8 and torch._int_mm, with the same numbers.

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

// ---------------------------------------------------------------- nibble lookup tables

// A LUT maps nibble u (two's-complement int4 q4) to W8(q4) + offset; offset 128 gives the u8
// operand for vpdpbusd, offset 0 the signed W8 itself (for unpacking).
alignas(16) const int8_t kQ4[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

// All 256 int8 group scales -> their 16-byte LUT (offset 128): 4 KiB, L1-resident, so an
// int8 group costs one broadcast load. (uint8)(q4*gs + 128) equals int8(q4*gs) + 128,
// the same wrap-around as PackedW4.int8_weight for out-of-range scales.
struct Int8LutTable {
  alignas(64) uint8_t t[256][16];
  Int8LutTable() {
    for (int g = 0; g < 256; ++g)
      for (int u = 0; u < 16; ++u) t[g][u] = static_cast<uint8_t>(kQ4[u] * static_cast<int8_t>(g) + 128);
  }
};
const Int8LutTable kInt8Lut;

inline __m128i lut_int8_group(int8_t gs, int offset) {
  const __m128i l = _mm_load_si128(reinterpret_cast<const __m128i*>(kInt8Lut.t[static_cast<uint8_t>(gs)]));
  return offset == 128 ? l : _mm_xor_si128(l, _mm_set1_epi8(static_cast<char>(0x80)));
}

// fp16 group scale -> LUT replicated in all four 128-bit lanes.
// fp16 group scale (already widened to fp32, in every lane) -> LUT replicated in all four
// 128-bit lanes.
inline __m512i lut_fp16_f32(__m512 gs, int offset) {
  const __m512 q = _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0);  // kQ4
  // q4 * gs is exact in fp32 (4 x 11 significant bits), and clamping to the integer bounds
  // commutes with rounding, so this equals clamp(torch.round(q4.float() * gs.float()), ±127).
  // vrangeps imm 2 (bits 1:0 = 10, min of the absolute values; bits 3:2 = 00, sign of x):
  // min(|x|, 127) with x's sign, the symmetric clamp in one op. (Sign bits 01 would take the
  // sign of the selected operand: -145 would clamp to +127.)
  const __m512 w = _mm512_range_ps(_mm512_mul_ps(q, gs), _mm512_set1_ps(127.0f), 2);
  const __m512i wi = _mm512_add_epi32(_mm512_cvt_roundps_epi32(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                      _mm512_set1_epi32(offset));
  // Low byte of each int32 (vpmovdb), replicated to all lanes; measured faster than one
  // vpermb gather here.
  return _mm512_broadcast_i32x4(_mm512_cvtepi32_epi8(wi));
}

inline __m512i lut_fp16_zmm(const uint16_t* gs_bits, int offset) {
  return lut_fp16_f32(_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(*gs_bits))), offset);
}

inline __m128i lut_fp16_group(uint16_t gs_bits, int offset) {
  return _mm512_castsi512_si128(lut_fp16_zmm(&gs_bits, offset));
}

inline __m128i lut_channel(int offset) {
  alignas(16) int8_t t[16];
  for (int u = 0; u < 16; ++u) t[u] = static_cast<int8_t>((kQ4[u] * 16) + offset);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

enum Mode { kChannel = 0, kGroupI8 = 1, kGroupF16 = 2 };

struct WeightView {
  const uint8_t* qw;  // [N, Kb]
  int64_t Kb;         // bytes per row
  int64_t K;
  const void* gs;  // [N, G] int8 or fp16 bits, or null
  int64_t G;
  int64_t group_size;
};

template <int MODE>
inline __m128i lut_group(const WeightView& w, int64_t n, int64_t g, int offset) {
  if constexpr (MODE == kGroupI8) {
    return lut_int8_group(static_cast<const int8_t*>(w.gs)[n * w.G + g], offset);
  } else {
    return lut_fp16_group(static_cast<const uint16_t*>(w.gs)[n * w.G + g], offset);
  }
}

// Group index of each 128-bit lane of chunk c (a lane covers 32 consecutive k, which is why
// group_size % 32 == 0 is required; WIDE means group_size % 128 == 0, one group per chunk).
// Lanes past K take the last group: their activations are zero padding. Computed once per
// chunk, outside the row loop (a 64-bit division per row was a measurable cost).
struct ChunkGroups {
  int64_t g[4];
};

template <int MODE, bool WIDE>
inline ChunkGroups chunk_groups(const WeightView& w, int64_t c) {
  ChunkGroups cg{{0, 0, 0, 0}};
  if constexpr (MODE != kChannel) {
    for (int l = 0; l < (WIDE ? 1 : 4); ++l) cg.g[l] = std::min((c * KC + 32 * l) / w.group_size, w.G - 1);
  }
  return cg;
}

// The zmm LUT for one chunk of row n.
template <int MODE, bool WIDE>
inline __m512i chunk_lut(const WeightView& w, int64_t n, const ChunkGroups& cg, int offset) {
  if constexpr (MODE == kChannel) {
    return _mm512_broadcast_i32x4(lut_channel(offset));
  } else if constexpr (WIDE && MODE == kGroupF16) {
    return lut_fp16_zmm(static_cast<const uint16_t*>(w.gs) + n * w.G + cg.g[0], offset);
  } else if constexpr (WIDE) {
    return _mm512_broadcast_i32x4(lut_group<MODE>(w, n, cg.g[0], offset));
  } else {
    __m512i r = _mm512_castsi128_si512(lut_group<MODE>(w, n, cg.g[0], offset));
    r = _mm512_inserti32x4(r, lut_group<MODE>(w, n, cg.g[1], offset), 1);
    r = _mm512_inserti32x4(r, lut_group<MODE>(w, n, cg.g[2], offset), 2);
    r = _mm512_inserti32x4(r, lut_group<MODE>(w, n, cg.g[3], offset), 3);
    return r;
  }
}

// MT tokens x NT rows, one zmm accumulator per (token, row) holding 16 partial sums.
// SCRATCH: chunk LUTs come from `luts` (nchunks zmm per row, rows consecutive from n0),
// filled once per call; otherwise they are built inline (cheap for per-channel and int8).
// kF16Inline: fp16 WIDE groups without scratch take their scales from `gsf`, the block's
// scales pre-widened to fp32 ([row][G], rows from n0), saving a conversion per LUT.
template <int MODE, bool WIDE, bool SCRATCH>
constexpr bool kF16Inline = MODE == kGroupF16 && WIDE && !SCRATCH;

// `pf`: how far ahead (bytes) to prefetch the weights into L2 while they stream from memory
// (0: they are already cached, see gemm_packed_run).
template <int MT, int NT, int MODE, bool WIDE, bool SCRATCH>
inline void micro(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t n0,
                  const __m512i* luts, const float* gsf, int64_t pf) {
  __m512i acc[MT][NT];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0)), c80 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t nchunks = a.Kp / KC;
  const int64_t full = w.Kb / 64;  // chunks whose 64 bytes all lie inside the row
  auto chunk = [&](int64_t c, auto tail) {
    const ChunkGroups cg = chunk_groups<MODE, WIDE>(w, c);
    __m512i alo[MT], ahi[MT];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const int8_t* ap = a.q + (m0 + i) * a.Kp + c * KC;
      alo[i] = _mm512_loadu_si512(ap);
      ahi[i] = _mm512_loadu_si512(ap + 64);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const uint8_t* wp = w.qw + (n0 + j) * w.Kb + c * 64;
      if (pf) prefetch_l2(wp + pf);
      // Padded activation columns are zero, so whatever the LUT makes of padding is harmless.
      __m512i b;
      if constexpr (decltype(tail)::value)
        b = _mm512_maskz_loadu_epi8(mask64(w.Kb - c * 64), wp);
      else
        b = _mm512_loadu_si512(wp);
      __m512i lo, hi;
      if constexpr (MODE == kChannel) {
        // W8 + 128 = 16 * q4 + 128 = (nibble << 4) ^ 0x80: a shift and two vpternlogd
        // (imm 0x6A = (A & B) ^ C with B = 0xF0, C = 0x80), no shuffles.
        lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(b, 4), f0, c80, 0x6A);
        hi = _mm512_ternarylogic_epi32(b, f0, c80, 0x6A);
      } else if constexpr (WIDE && !(MT == 1 && MODE == kGroupI8)) {
        // All four lanes hold the same 16-entry LUT, so vpermb (6-bit index, ignores bits
        // 6-7) can look up the raw byte / shifted byte directly: no masking needed. (Measured
        // on Zen 5: faster than and + vpshufb except for the int8-group GEMV.)
        __m512i lut;
        if constexpr (SCRATCH)
          lut = _mm512_load_si512(luts + j * nchunks + c);
        else if constexpr (kF16Inline<MODE, WIDE, SCRATCH>)
          lut = lut_fp16_f32(_mm512_set1_ps(gsf[j * w.G + cg.g[0]]), 128);
        else
          lut = chunk_lut<MODE, WIDE>(w, n0 + j, cg, 128);
        lo = _mm512_permutexvar_epi8(b, lut);
        hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(b, 4), lut);
      } else {
        const __m512i lut = SCRATCH ? _mm512_load_si512(luts + j * nchunks + c) : chunk_lut<MODE, WIDE>(w, n0 + j, cg, 128);
        lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(b, m0f));
        hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(b, 4), m0f));
      }
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) {
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo, alo[i]);
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi, ahi[i]);
      }
    }
  };
  for (int64_t c = 0; c < full; ++c) chunk(c, std::false_type{});
  for (int64_t c = full; c < nchunks; ++c) chunk(c, std::true_type{});
  // acc = sum (W8 + 128) * a; subtract 128 * sum(a). Wrap-around int32 arithmetic, so the
  // result is exact whenever the true value fits in int32.
  if constexpr (MT * NT == 16) {
    // Copy out instead of passing &acc: taking the array's address would keep the
    // accumulators in memory (spilled) throughout the k loop.
    __m512i v[16];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) v[i * NT + j] = acc[i][j];
    finish_tile<MT, NT>(a, e, m0, n0, reduce16(v));
  } else {
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const uint32_t corr = static_cast<uint32_t>(a.asum[m]) * 128u;
      for (int j = 0; j < NT; ++j) {
        const uint32_t r = static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j])) - corr;
        write_out(e, m, n0 + j, static_cast<int32_t>(r), a.s[m]);
      }
    }
  }
}

template <int MT, int NT, int MODE, bool WIDE, bool SCRATCH>
inline void rows_block(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t n_begin,
                       int64_t n_end, const __m512i* luts, int64_t nchunks, const float* gsf, int64_t pf) {
  int64_t n = n_begin;
  for (; n + NT <= n_end; n += NT)
    micro<MT, NT, MODE, WIDE, SCRATCH>(a, w, e, m0, n, luts + (n - n_begin) * nchunks, gsf + (n - n_begin) * w.G, pf);
  for (; n < n_end; ++n)
    micro<MT, 1, MODE, WIDE, SCRATCH>(a, w, e, m0, n, luts + (n - n_begin) * nchunks, gsf + (n - n_begin) * w.G, pf);
}

template <int MODE, bool WIDE, bool SCRATCH>
void gemm_packed_run(const ActView& a, int64_t M, const WeightView& w, const Epilogue& e) {
  const int64_t N = e.N;
  const int64_t nchunks = a.Kp / KC;
  // Row blocks: a block's packed rows (and LUTs) stay in L2 while every token tile streams
  // past them; 32 rows also gives a few blocks per thread for load balance.
  constexpr int64_t NB = 32;
  const int64_t nblocks = ceil_div(N, NB);
  // Tiny problems run on the calling thread: waking the pool costs more than the work.
  // parallel_items, not at::parallel_for: it does not stall on a busy machine (parallel_cpu.cpp).
  parallel_items(nblocks, M * N * w.K >= (1 << 19), [&](int64_t b0, int64_t b1) {
    // thread_local: one allocation per thread, not one per 32-row block.
    thread_local std::vector<__m512i> scratch;
    thread_local std::vector<float> gsf;
    if (SCRATCH && scratch.size() < static_cast<size_t>(NB * nchunks)) scratch.resize(NB * nchunks);
    if (kF16Inline<MODE, WIDE, SCRATCH> && gsf.size() < static_cast<size_t>(NB * w.G)) gsf.resize(NB * w.G);
    const __m512i* luts = scratch.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n_begin = blk * NB, n_end = std::min(N, n_begin + NB);
      if constexpr (kF16Inline<MODE, WIDE, SCRATCH>) {
        const uint16_t* src = static_cast<const uint16_t*>(w.gs) + n_begin * w.G;
        const int64_t cnt = (n_end - n_begin) * w.G;
        for (int64_t i = 0; i < cnt; i += 16) {
          const __mmask16 mk = mask16(cnt - i);
          _mm512_mask_storeu_ps(gsf.data() + i, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, src + i)));
        }
      }
      if constexpr (SCRATCH) {
        for (int64_t n = n_begin; n < n_end; ++n)
          for (int64_t c = 0; c < nchunks; ++c)
            _mm512_store_si512(&scratch[(n - n_begin) * nchunks + c], chunk_lut<MODE, WIDE>(w, n, chunk_groups<MODE, WIDE>(w, c), 128));
      }
      // The first token tile streams the block's rows from memory (the later ones find them
      // in L2) and prefetches the rows kPrefetchRows ahead into L2.
      const int64_t pf = kPrefetchRows * w.Kb;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        rows_block<4, 4, MODE, WIDE, SCRATCH>(a, w, e, m, n_begin, n_end, luts, nchunks, gsf.data(), m == 0 ? pf : 0);
      if (M - m >= 2) {
        rows_block<2, 8, MODE, WIDE, SCRATCH>(a, w, e, m, n_begin, n_end, luts, nchunks, gsf.data(), m == 0 ? pf : 0);
        m += 2;
      }
      if (M - m == 1)
        rows_block<1, 16, MODE, WIDE, SCRATCH>(a, w, e, m, n_begin, n_end, luts, nchunks, gsf.data(), m == 0 ? pf : 0);
    }
  });
}

template <int MODE, bool WIDE>
void gemm_packed_impl(const ActView& a, int64_t M, const WeightView& w, const Epilogue& e) {
  // Building a LUT costs about as much as using it once, so with several token tiles per
  // row the fp16 (and narrow-group int8) LUTs are built once per call into a scratch.
  // Per-channel and int8 groups with group_size % 128 == 0 need one broadcast, never scratch.
  constexpr bool kCheap = MODE == kChannel || (MODE == kGroupI8 && WIDE);
  if (!kCheap && M > 4)
    gemm_packed_run<MODE, WIDE, !kCheap>(a, M, w, e);
  else
    gemm_packed_run<MODE, WIDE, false>(a, M, w, e);
}

// ---------------------------------------------------------------- unpack to int8

template <int MODE, bool WIDE>
void unpack_impl(const WeightView& w, int64_t N, int8_t* out) {
  const int64_t K = w.K;
  const int64_t nchunks = ceil_div(K, KC);
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  __m512i idx0, idx1;  // interleave lo/hi nibble values back into natural k order
  {
    alignas(64) uint8_t i0[64], i1[64];
    for (int p = 0; p < 64; ++p) {
      i0[p] = static_cast<uint8_t>((p & 1 ? 64 : 0) + p / 2);
      i1[p] = static_cast<uint8_t>((p & 1 ? 64 : 0) + 32 + p / 2);
    }
    idx0 = _mm512_load_si512(i0);
    idx1 = _mm512_load_si512(i1);
  }
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w.qw + n * w.Kb;
      int8_t* dst = out + n * K;
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t k = c * KC;
        const bool full = K - k >= KC;
        const __m512i b = full ? _mm512_loadu_si512(row + c * 64) : _mm512_maskz_loadu_epi8(mask64(w.Kb - c * 64), row + c * 64);
        const __m512i lut = chunk_lut<MODE, WIDE>(w, n, chunk_groups<MODE, WIDE>(w, c), 0);
        const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(b, m0f));
        const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(b, 4), m0f));
        const __m512i v0 = _mm512_permutex2var_epi8(lo, idx0, hi), v1 = _mm512_permutex2var_epi8(lo, idx1, hi);
        if (full) {  // masked stores are slow on some cores; keep them for the tail
          _mm512_storeu_si512(dst + k, v0);
          _mm512_storeu_si512(dst + k + 64, v1);
        } else {
          _mm512_mask_storeu_epi8(dst + k, mask64(K - k), v0);
          if (K - k > 64) _mm512_mask_storeu_epi8(dst + k + 64, mask64(K - k - 64), v1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- weight views

WeightView make_weight_view(const at::Tensor& qweight, const c10::optional<at::Tensor>& group_scale, int64_t K,
                            int64_t group_size, int* mode, bool* wide) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(), "qweight: uint8 [N, Kb]");
  TORCH_CHECK(qweight.size(1) == (K + 1) / 2, "qweight has ", qweight.size(1), " bytes per row, K=", K);
  WeightView w{qweight.data_ptr<uint8_t>(), qweight.size(1), K, nullptr, 1, group_size};
  *mode = kChannel;
  *wide = true;
  if (group_scale.has_value()) {
    const at::Tensor& gs = *group_scale;
    TORCH_CHECK(gs.is_contiguous() && gs.dim() == 2 && gs.size(0) == qweight.size(0), "group_scale: [N, G]");
    TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "fast path needs group_size % 32 == 0");
    TORCH_CHECK(gs.size(1) == ceil_div(K, group_size), "group_scale has the wrong number of groups");
    w.gs = gs.data_ptr();
    w.G = gs.size(1);
    *wide = group_size % KC == 0;
    if (gs.dtype() == at::kChar)
      *mode = kGroupI8;
    else if (gs.dtype() == at::kHalf)
      *mode = kGroupF16;
    else
      TORCH_CHECK(false, "group_scale must be int8 or float16");
  }
  return w;
}

#define DISPATCH_MODE(mode, wide, FN, ...)                    \
  do {                                                        \
    if ((mode) == kChannel)                                   \
      FN<kChannel, true>(__VA_ARGS__);                        \
    else if ((mode) == kGroupI8 && (wide))                    \
      FN<kGroupI8, true>(__VA_ARGS__);                        \
    else if ((mode) == kGroupI8)                              \
      FN<kGroupI8, false>(__VA_ARGS__);                       \
    else if (wide)                                            \
      FN<kGroupF16, true>(__VA_ARGS__);                       \
    else                                                      \
      FN<kGroupF16, false>(__VA_ARGS__);                      \
  } while (0)

// Whether the SIMD LUT kernels can take this group size.
inline bool simd_groups(const c10::optional<at::Tensor>& group_scale, int64_t group_size) {
  return !group_scale.has_value() || (group_size > 0 && group_size % 32 == 0);
}

// Scalar W8 = f(q4, gs) for any group size, exactly as PackedW4.int8_weight (reference path).
at::Tensor unpack_w8_scalar(const at::Tensor& qweight, const at::Tensor& gs, int64_t K, int64_t group_size) {
  const int64_t N = qweight.size(0), Kb = qweight.size(1), G = gs.size(1);
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(at::kChar));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  const bool i8 = gs.scalar_type() == at::kChar;
  const int8_t* g8 = i8 ? gs.data_ptr<int8_t>() : nullptr;
  const c10::Half* g16 = i8 ? nullptr : gs.data_ptr<c10::Half>();
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t b = qw[n * Kb + k / 2];
        const int q4 = kQ4[(k & 1) ? (b >> 4) : (b & 0xF)];
        const int64_t g = k / group_size;
        if (i8) {
          o[n * K + k] = static_cast<int8_t>(static_cast<int16_t>(q4 * g8[n * G + g]));  // wraps like torch
        } else {
          // q4 * gs is exact in fp32; nearbyint rounds half to even like torch.round.
          const float w = std::nearbyint(static_cast<float>(q4) * static_cast<float>(g16[n * G + g]));
          o[n * K + k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, w)));
        }
      }
  });
  return out;
}

}  // namespace

// y [M, N] = ((xq @ W8.T) - nothing) * s * channel_scale + bias, reading packed int4 directly.
at::Tensor gemm_packed(const at::Tensor& qperm, const at::Tensor& asum, const at::Tensor& xs, const at::Tensor& qweight,
                       const at::Tensor& channel_scale, const c10::optional<at::Tensor>& group_scale,
                       const c10::optional<at::Tensor>& bias, int64_t K, int64_t group_size, at::ScalarType out_dtype) {
  int mode;
  bool wide;
  WeightView w = make_weight_view(qweight, group_scale, K, group_size, &mode, &wide);
  const int64_t M = qperm.size(0), N = qweight.size(0);
  TORCH_CHECK(qperm.dtype() == at::kChar && qperm.is_contiguous() && qperm.size(1) == ceil_div(K, KC) * KC,
              "qperm must be the permuted int8 activations");
  at::Tensor sch = channel_scale.contiguous().to(at::kFloat);
  at::Tensor xsf = xs.contiguous().to(at::kFloat);
  at::Tensor as = asum.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  at::Tensor out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  ActView a{qperm.data_ptr<int8_t>(), qperm.size(1), as.data_ptr<int32_t>(), xsf.data_ptr<float>()};
  Epilogue e{sch.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr, out.data_ptr(), N, out_kind(out_dtype)};
  count_path(M == 1 ? kW4Gemv : kW4GemmPacked);
  DISPATCH_MODE(mode, wide, gemm_packed_impl, a, M, w, e);
  return out;
}

// W8 int8 [N, K] from the packed format (for the large-M path through torch._int_mm).
at::Tensor unpack_w8(const at::Tensor& qweight, const c10::optional<at::Tensor>& group_scale, int64_t K,
                     int64_t group_size) {
  if (!simd_groups(group_scale, group_size)) return unpack_w8_scalar(qweight.contiguous(), group_scale->contiguous(), K, group_size);
  int mode;
  bool wide;
  WeightView w = make_weight_view(qweight, group_scale, K, group_size, &mode, &wide);
  at::Tensor out = at::empty({qweight.size(0), K}, qweight.options().dtype(at::kChar));
  DISPATCH_MODE(mode, wide, unpack_impl, w, qweight.size(0), out.data_ptr<int8_t>());
  return out;
}

at::Tensor w4a8_linear_2d(const at::Tensor& x, const at::Tensor& xq_nat, const at::Tensor& xs, const at::Tensor& qweight,
                     const at::Tensor& channel_scale, const c10::optional<at::Tensor>& group_scale,
                     const c10::optional<at::Tensor>& bias, int64_t group_size, at::ScalarType out_dtype) {
  // Either x (float, quantized here) or xq_nat/xs (already int8) is defined.
  const bool have_q = xq_nat.defined();
  const int64_t M = have_q ? xq_nat.size(0) : x.size(0), K = have_q ? xq_nat.size(1) : x.size(1);
  const c10::optional<at::Tensor> gs = group_scale.has_value() ? c10::optional<at::Tensor>(group_scale->contiguous()) : group_scale;
  const at::Tensor qw = qweight.contiguous();
  if (use_packed(M, K) && simd_groups(gs, group_size)) {
    std::vector<at::Tensor> qa = have_q ? permute_act(xq_nat) : quantize(x, true);
    if (have_q) return gemm_packed(qa[0], qa[1], xs, qw, channel_scale, gs, bias, K, group_size, out_dtype);
    return gemm_packed(qa[0], qa[2], qa[1], qw, channel_scale, gs, bias, K, group_size, out_dtype);
  }
  at::Tensor q = xq_nat, s = xs;
  if (!have_q) {
    std::vector<at::Tensor> qa = quantize(x, false);
    q = qa[0];
    s = qa[1];
  }
  count_path(kW4IntMm);
  at::Tensor acc = int_mm(q.contiguous(), unpack_w8(qw, gs, K, group_size));
  return epilogue(acc, s, channel_scale, bias, out_dtype);
}

}  // namespace qqq
