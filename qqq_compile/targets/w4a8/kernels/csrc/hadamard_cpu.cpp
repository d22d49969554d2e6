// The online Hadamard of the rotate pass, x·(F1 ⊗ … ⊗ Fr), as one kernel (qqq_cpu::kron_transform).
//
// Why: the pass writes it as torch ops, an mm for the last factor and a bmm of a broadcast
// factor for each other one. On SmolLM2 (1536 = 12·128) that chain took 1.7 ms per layer for
// a 256-token prefill chunk (the bmm of 256 tiny 12x12 products 1.2 ms, the 128x128 mm 0.5
// ms), a quarter of the prefill, and 17 us per layer at decode. Here every factor is applied
// along its own axis of the row viewed as [f1, ..., fr], in fp32 with vector FMAs: for an
// axis with 16 or more trailing elements the 16 lanes run over them, for the last axis over
// the factor's output columns. The caller splits a Sylvester factor into small Sylvester
// factors (H_ab = H_a ⊗ H_b), so 128 costs 8 + 16 MACs per element instead of 128.

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {
namespace {

// Four independent accumulators per inner loop: one FMA chain would wait on its own latency.
constexpr int64_t kU = 4;

// out[p, c, q..q+15] for c in [c0, c0 + U): U outputs share each loaded input vector.
template <int64_t U>
inline void cols_wide(const float* src, float* dst, const float* F, int64_t f, int64_t post, int64_t q, int64_t c0,
                      __mmask16 m) {
  __m512 acc[U];
  for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t a = 0; a < f; ++a) {
    const __m512 v = _mm512_maskz_loadu_ps(m, src + a * post + q);
    for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(F[a * f + c0 + u]), v, acc[u]);
  }
  for (int64_t u = 0; u < U; ++u) _mm512_mask_storeu_ps(dst + (c0 + u) * post + q, m, acc[u]);
}

// out[p0 + u, c..c+15] (post == 1): U rows p share each loaded row of F.
template <int64_t U>
inline void rows_last(const float* in, float* out, const float* F, int64_t f, int64_t p0, int64_t c, __mmask16 m) {
  __m512 acc[U];
  for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t a = 0; a < f; ++a) {
    const __m512 w = _mm512_maskz_loadu_ps(m, F + a * f + c);
    for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(in[(p0 + u) * f + a]), w, acc[u]);
  }
  for (int64_t u = 0; u < U; ++u) _mm512_mask_storeu_ps(out + (p0 + u) * f + c, m, acc[u]);
}

// out[p, c, q] = sum_a in[p, a, q] * F[a, c] for the axis of size f with `post` trailing elements.
void apply_axis(const float* in, float* out, const float* F, int64_t pre, int64_t f, int64_t post) {
  if (post >= 16) {
    for (int64_t p = 0; p < pre; ++p) {
      const float* src = in + p * f * post;
      float* dst = out + p * f * post;
      for (int64_t q = 0; q < post; q += 16) {
        const __mmask16 m = mask16(post - q);
        int64_t c = 0;
        for (; c + kU <= f; c += kU) cols_wide<kU>(src, dst, F, f, post, q, c, m);
        for (; c < f; ++c) cols_wide<1>(src, dst, F, f, post, q, c, m);
      }
    }
  } else if (post == 1) {
    for (int64_t c = 0; c < f; c += 16) {
      const __mmask16 m = mask16(f - c);
      int64_t p = 0;
      for (; p + kU <= pre; p += kU) rows_last<kU>(in, out, F, f, p, c, m);
      for (; p < pre; ++p) rows_last<1>(in, out, F, f, p, c, m);
    }
  } else {  // a few trailing elements (e.g. 576 = 12·12·4): small, scalar
    for (int64_t p = 0; p < pre; ++p)
      for (int64_t c = 0; c < f; ++c)
        for (int64_t q = 0; q < post; ++q) {
          float acc = 0.f;
          for (int64_t a = 0; a < f; ++a) acc += in[(p * f + a) * post + q] * F[a * f + c];
          out[(p * f + c) * post + q] = acc;
        }
  }
}

}  // namespace

at::Tensor kron_transform(const at::Tensor& x, const at::Tensor& factors, at::IntArrayRef sizes) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "qqq_cpu::kron_transform: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(factors.scalar_type() == at::kFloat && factors.dim() == 1, "qqq_cpu::kron_transform: factors must be flat float32");
  int64_t k = 1, total = 0;
  for (int64_t f : sizes) {
    TORCH_CHECK(f >= 1, "qqq_cpu::kron_transform: factor sizes must be positive");
    k *= f;
    total += f * f;
  }
  TORCH_CHECK(!sizes.empty() && x.dim() >= 1 && x.size(-1) == k, "qqq_cpu::kron_transform: the last dim of x (",
              x.dim() ? x.size(-1) : 0, ") must be the product of the factor sizes (", k, ")");
  TORCH_CHECK(factors.numel() == total, "qqq_cpu::kron_transform: factors holds ", factors.numel(),
              " values, the sizes need ", total);
  count_path(kKron);
  const at::Tensor xc = x.contiguous(), fc = factors.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = xc.numel() / k;
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float* fp = fc.data_ptr<float>();
  std::vector<int64_t> offsets, pres, posts;
  for (size_t i = 0, off = 0; i < sizes.size(); off += sizes[i] * sizes[i], ++i) {
    int64_t pre = 1, post = 1;
    for (size_t j = 0; j < i; ++j) pre *= sizes[j];
    for (size_t j = i + 1; j < sizes.size(); ++j) post *= sizes[j];
    offsets.push_back(static_cast<int64_t>(off));
    pres.push_back(pre);
    posts.push_back(post);
  }
  const int64_t r = static_cast<int64_t>(sizes.size());
  // Rows in groups of 8: a decode token runs on the calling thread (parallel_items, false).
  constexpr int64_t kRows = 8;
  parallel_items(ceil_div(rows, kRows), rows * k >= (1 << 15), [&](int64_t g0, int64_t g1) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(2 * k)) buf.resize(2 * k);
    for (int64_t row = g0 * kRows; row < std::min(rows, g1 * kRows); ++row) {
      // Ping-pong between two scratch rows; the last factor writes the output row.
      const float* in = src + row * k;
      for (int64_t i = r - 1; i >= 0; --i) {
        float* o = i == 0 ? dst + row * k : buf.data() + ((r - 1 - i) % 2) * k;
        apply_axis(in, o, fp + offsets[i], pres[i], sizes[i], posts[i]);
        in = o;
      }
    }
  });
  return out;
}

}  // namespace qqq
