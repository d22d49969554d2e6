// GPTQ's column loop inside one block of columns (compiler/gptq_solve.py: _gptq), per row.
//
// Why: in torch the loop runs ~8 small ops per column (quantize, error, two rank-1 updates),
// thousands of dispatches per linear on one thread: ~1.0 s of SmolLM2's ~6.3 s GPTQ block,
// while the arithmetic is a few milliseconds. Within a block every row is independent (the
// rows share only hinv and p), so rows run in parallel, each a short triangular loop over
// the block's columns in cache.
//
// Rounding: a column's value goes to the nearest entry of its row's value table (the decoded
// value of every code of its group; +inf marks codes never chosen), the first one on a tie,
// as the torch loop's argmin does. Tables of up to 16 codes (int4) are searched in one zmm:
// the same distances, the lowest lane that holds their minimum (the scalar search took ~40
// cycles per weight, a third of the loop). Built with -ffp-contract=off: w - e·h and w + v·p are each
// a rounded product then a rounded sum, as torch's addr_ computes them.

#include <ATen/Parallel.h>

#include <cmath>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {

void gptq_block(const at::Tensor& w, const at::Tensor& hinv, const c10::optional<at::Tensor>& p,
                const at::Tensor& table, const at::Tensor& groups, int64_t qmin, const at::Tensor& q_out,
                const at::Tensor& deq_out, const at::Tensor& err) {
  TORCH_CHECK(w.dim() == 2, "gptq_block: w must be float32 [N, B]");
  const int64_t N = w.size(0), B = w.size(1);
  auto f32_2d = [](const at::Tensor& t, int64_t r, int64_t c) {
    return t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == r && t.size(1) == c && t.stride(1) == 1;
  };
  TORCH_CHECK(f32_2d(w, N, B), "gptq_block: w must be float32 [N, B] with unit column stride");
  TORCH_CHECK(f32_2d(hinv, B, B), "gptq_block: hinv must be float32 [B, B] with unit column stride");
  TORCH_CHECK(!p.has_value() || f32_2d(*p, B, B), "gptq_block: p must be float32 [B, B] with unit column stride");
  TORCH_CHECK(f32_2d(q_out, N, B) && f32_2d(deq_out, N, B) && f32_2d(err, N, B),
              "gptq_block: q_out, deq_out and err must be float32 [N, B] with unit column stride");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 3 && table.size(1) == N && table.is_contiguous(),
              "gptq_block: table must be contiguous float32 [G, N, C]");
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.dim() == 1 && groups.size(0) == B && groups.is_contiguous(),
              "gptq_block: groups must be int64 [B]");
  const int64_t G = table.size(0), C = table.size(2);
  const int64_t* gp = groups.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) TORCH_CHECK(gp[i] >= 0 && gp[i] < G, "gptq_block: group ", gp[i], " out of range");
  float* wp = w.data_ptr<float>();
  const float* hp = hinv.data_ptr<float>();
  const float* pp = p.has_value() ? p->data_ptr<float>() : nullptr;
  const float* tp = table.data_ptr<float>();
  float* qp = q_out.data_ptr<float>();
  float* dp = deq_out.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  const int64_t lw = w.stride(0), lh = hinv.stride(0), lp = p.has_value() ? p->stride(0) : 0;
  const int64_t lq = q_out.stride(0), ld = deq_out.stride(0), le = err.stride(0);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = wp + r * lw;
      for (int64_t i = 0; i < B; ++i) {
        const float v = wr[i];  // later columns only are updated below: v keeps its value
        const float* t = tp + (gp[i] * N + r) * C;
        int64_t best = 0;
        if (C <= 16) {  // the int4 tables: all distances in one zmm, the first minimum
          const __mmask16 m = mask16(C);
          const __m512 tv = _mm512_mask_loadu_ps(_mm512_set1_ps(INFINITY), m, t);
          const __m512 d = _mm512_abs_ps(_mm512_sub_ps(_mm512_set1_ps(v), tv));
          const __mmask16 at = _mm512_cmp_ps_mask(d, _mm512_set1_ps(_mm512_reduce_min_ps(d)), _CMP_EQ_OQ);
          best = at ? __builtin_ctz(at) : 0;
        } else {
          float dist = std::fabs(v - t[0]);
          for (int64_t c = 1; c < C; ++c) {
            const float d = std::fabs(v - t[c]);
            if (d < dist) dist = d, best = c;
          }
        }
        const float dq = t[best];
        const float e = (v - dq) / hp[i * lh + i];
        qp[r * lq + i] = static_cast<float>(best + qmin);
        dp[r * ld + i] = dq;
        ep[r * le + i] = e;
        const float* h = hp + i * lh;
        if (pp) {  // one pass, each entry rounded as by the two updates in turn
          const float* pr = pp + i * lp;
          for (int64_t j = i + 1; j < B; ++j) wr[j] = (wr[j] - e * h[j]) + v * pr[j];
        } else {
          for (int64_t j = i + 1; j < B; ++j) wr[j] = wr[j] - e * h[j];
        }
      }
    }
  });
  count_path(kGptqBlock);
}

}  // namespace qqq
