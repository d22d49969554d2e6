// GPTQ's Hessian staging (compiler/gptq_solve.py: HessianAccumulator): one pass writes a
// batch's rows into the bf16 chunk the accumulator's GEMMs read, [x | x_float - x], from the
// quantized run's int8 codes and scales (x = q * s) or its fp32 values.
//
// Why: the same in torch took five passes over fp32 temporaries (q.float(), mul_, the bf16
// copy, the subtraction, its copy): ~0.5 s of SmolLM2's ~8.5 s GPTQ block. The values are
// bit-identical: x = float(q) * s and x_float - x are the same IEEE fp32 operations, rounded
// to bf16 the way c10::BFloat16 rounds (simd.h: cvt_bf16).

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {

void hessian_stage(const at::Tensor& dst, const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& q,
                   const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& xf) {
  TORCH_CHECK(x.has_value() != q.has_value(), "hessian_stage: give x or q (with scale)");
  TORCH_CHECK(!q.has_value() || scale.has_value(), "hessian_stage: q needs its per-row scale");
  const at::Tensor& src = x.has_value() ? *x : *q;
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous(), "hessian_stage: x / q must be contiguous [M, K]");
  const int64_t M = src.size(0), K = src.size(1), W = xf.has_value() ? 2 * K : K;
  TORCH_CHECK(dst.scalar_type() == at::kBFloat16 && dst.dim() == 2 && dst.size(0) == M && dst.size(1) == W &&
                  dst.stride(1) == 1,
              "hessian_stage: dst must be bf16 [M, ", W, "] with unit column stride");
  TORCH_CHECK(!x.has_value() || x->scalar_type() == at::kFloat, "hessian_stage: x must be float32");
  TORCH_CHECK(!q.has_value() || (q->scalar_type() == at::kChar && scale->scalar_type() == at::kFloat &&
                                 scale->numel() == M && scale->is_contiguous()),
              "hessian_stage: q int8 [M, K] and scale float32 [M]");
  const bool xf_bf16 = xf.has_value() && xf->scalar_type() == at::kBFloat16;
  TORCH_CHECK(!xf.has_value() || ((xf->scalar_type() == at::kFloat || xf_bf16) && xf->sizes() == src.sizes() &&
                                  xf->is_contiguous()),
              "hessian_stage: x_float must be float32 or bfloat16 [M, K], contiguous");
  uint16_t* out = reinterpret_cast<uint16_t*>(dst.data_ptr<at::BFloat16>());
  const int64_t ld = dst.stride(0);
  const float* xp = x.has_value() ? x->data_ptr<float>() : nullptr;
  const int8_t* qp = q.has_value() ? q->data_ptr<int8_t>() : nullptr;
  const float* sp = q.has_value() ? scale->data_ptr<float>() : nullptr;
  const void* fp = xf.has_value() ? xf->data_ptr() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint16_t* o = out + m * ld;
      for (int64_t c = 0; c < K; c += 16) {
        const __mmask16 mk = mask16(K - c);
        __m512 v;
        if (qp) {
          const __m128i b = _mm_maskz_loadu_epi8(mk, qp + m * K + c);
          v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(sp[m]));
        } else {
          v = load16(xp + m * K + c, mk);
        }
        _mm256_mask_storeu_epi16(o + c, mk, cvt_bf16(v));
        if (fp) {
          const int64_t i = m * K + c;
          const __m512 f = xf_bf16 ? load16(static_cast<const c10::BFloat16*>(fp) + i, mk)
                                   : load16(static_cast<const float*>(fp) + i, mk);
          _mm256_mask_storeu_epi16(o + K + c, mk, cvt_bf16(_mm512_sub_ps(f, v)));
        }
      }
    }
  });
  count_path(kHessianStage);
}

}  // namespace qqq
