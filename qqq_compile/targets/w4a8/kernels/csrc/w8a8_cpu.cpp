// W8A8 CPU linear: int8 weights [N, K] with a per-output-channel fp32 scale, per-token int8
// activations, exact int32 accumulation, epilogue ((acc * s_tok) * s_ch) + bias in fp32.
//
// Meant for the lm_head (and the tied embedding), the largest float matrix of a small LLM:
// at decode (M = 1) the GEMV is memory-bound, and int8 reads a quarter of the fp32 bytes.
//
// Same VNNI trick as the W4A8 kernel: vpdpbusd multiplies u8 x s8, so the *weight* becomes the
// unsigned operand, u8 = W8 ^ 0x80 = W8 + 128, and acc = exact + 128 * sum_k a_k; the
// correction depends on the token only (no weight row sums needed). Activations stay in
// natural order. Large M goes to oneDNN through torch._int_mm (see use_packed).

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

constexpr int64_t KB = 64;  // k per zmm

template <int MT, int NT>
inline void micro8(const ActView& a, const int8_t* w, int64_t K, const Epilogue& e, int64_t m0, int64_t n0, int64_t pf) {
  __m512i acc[MT][NT];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i c80 = _mm512_set1_epi8(static_cast<char>(0x80));
  auto chunk = [&](int64_t k, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    const __mmask64 mk = kTail ? mask64(K - k) : ~0ULL;
    __m512i av[MT];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const int8_t* ap = a.q + (m0 + i) * a.Kp + k;
      av[i] = kTail ? _mm512_maskz_loadu_epi8(mk, ap) : _mm512_loadu_si512(ap);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const int8_t* wp = w + (n0 + j) * K + k;
      if (pf) prefetch_l2(wp + pf);
      // Past K the activations are zero, so the 0x80 the masked-off weight bytes become adds nothing.
      const __m512i b = _mm512_xor_si512(kTail ? _mm512_maskz_loadu_epi8(mk, wp) : _mm512_loadu_si512(wp), c80);
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b, av[i]);
    }
  };
  const int64_t full = K / KB * KB;
  for (int64_t k = 0; k < full; k += KB) chunk(k, std::false_type{});
  if (full < K) chunk(full, std::true_type{});
  if constexpr (MT * NT == 16) {
    __m512i v[16];  // copied out so the accumulators stay in registers (see micro in w4a8_cpu.cpp)
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

template <int MT, int NT>
inline void rows8(const ActView& a, const int8_t* w, int64_t K, const Epilogue& e, int64_t m0, int64_t n_begin,
                  int64_t n_end, int64_t pf) {
  int64_t n = n_begin;
  for (; n + NT <= n_end; n += NT) micro8<MT, NT>(a, w, K, e, m0, n, pf);
  for (; n < n_end; ++n) micro8<MT, 1>(a, w, K, e, m0, n, pf);
}

void gemm_w8(const ActView& a, int64_t M, const int8_t* w, int64_t K, const Epilogue& e) {
  constexpr int64_t NB = 32;  // rows per block: they stay in L2 while the token tiles pass
  const int64_t nblocks = ceil_div(e.N, NB);
  // parallel_items, not at::parallel_for: it does not stall on a busy machine (parallel_cpu.cpp).
  parallel_items(nblocks, M * e.N * K >= (1 << 19), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n_begin = blk * NB, n_end = std::min(e.N, n_begin + NB);
      const int64_t pf = kPrefetchRows * K;  // as in gemm_packed_run (w4a8_cpu.cpp)
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows8<4, 4>(a, w, K, e, m, n_begin, n_end, m == 0 ? pf : 0);
      if (M - m >= 2) {
        rows8<2, 8>(a, w, K, e, m, n_begin, n_end, m == 0 ? pf : 0);
        m += 2;
      }
      if (M - m == 1) rows8<1, 16>(a, w, K, e, m, n_begin, n_end, m == 0 ? pf : 0);
    }
  });
}

}  // namespace

// Measured on SmolLM2's lm_head (N = 49152, K = 576; 2 busy vCPUs, ms, VNNI vs _int_mm):
// M=1 8.0 vs 10.8, M=4 8.0 vs 17.0, M=16 17.2 vs 19.8, M=32 33 vs 27, M=512 341 vs 261. No
// unpack to amortize (unlike W4), so the crossover does not grow with K. _int_mm is wrong for K == 1.
bool use_packed_w8(int64_t M, int64_t K) { return K < 2 || M < 16; }

at::Tensor w8a8_linear_2d(const at::Tensor& x, const at::Tensor& w8_in, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias, int64_t path) {
  const int64_t M = x.size(0), K = x.size(1), N = w8_in.size(0);
  const at::ScalarType out_dtype = x.scalar_type();
  const at::Tensor w8 = w8_in.contiguous();
  const bool vnni = K < 2 || (path < 0 ? use_packed_w8(M, K) : path == 1);
  count_path(!vnni ? kW8IntMm : M == 1 ? kW8Gemv : kW8GemmVnni);
  if (!vnni) {
    std::vector<at::Tensor> qa = quantize(x, false);
    return epilogue(int_mm(qa[0], w8), qa[1], scale, bias, out_dtype);
  }
  std::vector<at::Tensor> qa = quantize(x, false);  // natural order: (q [M, K], s [M], asum [M])
  at::Tensor sch = scale.contiguous().to(at::kFloat);
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  ActView a{qa[0].data_ptr<int8_t>(), K, qa[2].data_ptr<int32_t>(), qa[1].data_ptr<float>()};
  Epilogue e{sch.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr, out.data_ptr(), N, out_kind(out_dtype)};
  gemm_w8(a, M, w8.data_ptr<int8_t>(), K, e);
  return out;
}

}  // namespace qqq
