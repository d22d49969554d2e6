// Per-token int8 activation quantization, fused RMSNorm + quantization, and the int32 -> float
// epilogue shared by the W4A8 and W8A8 paths that go through torch._int_mm.

#include <ATen/ops/_int_mm.h>

#include "qqq_cpu.h"
#include "simd.h"

namespace qqq {

// x [M, K] float/bf16/f16 -> (q int8 [M, K] natural or [M, Kp] permuted, s f32 [M], asum int32 [M])
std::vector<at::Tensor> quantize(const at::Tensor& x_in, bool permute) {
  at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2, "quantize expects [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t Kp = ceil_div(K, KC) * KC;
  at::Tensor q = at::empty({M, permute ? Kp : K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor asum = at::empty({M}, x.options().dtype(at::kInt));
  auto run = [&](auto* ptr) {
    quantize_impl(ptr, M, K, q.data_ptr<int8_t>(), q.size(1), permute, s.data_ptr<float>(), asum.data_ptr<int32_t>());
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>());
  else if (x.scalar_type() == at::kBFloat16)
    run(x.data_ptr<c10::BFloat16>());
  else if (x.scalar_type() == at::kHalf)
    run(x.data_ptr<c10::Half>());
  else
    TORCH_CHECK(false, "quantize: unsupported dtype ", x.scalar_type());
  return {q, s, asum};
}

// Natural int8 [M, K] -> (permuted [M, Kp], asum int32 [M]).
std::vector<at::Tensor> permute_act(const at::Tensor& q_in) {
  at::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dtype() == at::kChar && q.dim() == 2, "permute_act expects int8 [M, K]");
  const int64_t M = q.size(0), K = q.size(1), Kp = ceil_div(K, KC) * KC;
  at::Tensor out = at::empty({M, Kp}, q.options());
  at::Tensor asum = at::empty({M}, q.options().dtype(at::kInt));
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  int32_t* as = asum.data_ptr<int32_t>();
  at::parallel_for(0, M, M * K >= (1 << 16) ? 1 : M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      permute_row(src + m * K, K, dst + m * Kp, Kp);
      as[m] = row_sum_i8(src + m * K, K);
    }
  });
  return {out, asum};
}

// RMSNorm in fp32 then per-token int8 (natural order): (q [M, K], s f32 [M]).
std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  at::Tensor x = x_in.contiguous().to(at::kFloat);
  at::Tensor wt = weight_in.contiguous().to(at::kFloat);
  TORCH_CHECK(x.dim() == 2 && wt.numel() == x.size(1), "rmsnorm_quant expects x [M, K], weight [K]");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, M, M * K >= (1 << 16) ? 1 : M, [&](int64_t m0, int64_t m1) {
    std::vector<float> y(K);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * K;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        __m512 v = _mm512_maskz_loadu_ps(mask16(K - k), xr + k);
        ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
      }
      const float mean = _mm512_reduce_add_ps(ss) / static_cast<float>(K);
      const float r = 1.0f / std::sqrt(mean + feps);
      const __m512 rv = _mm512_set1_ps(r);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = mask16(K - k);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), rv);
        _mm512_mask_storeu_ps(y.data() + k, mk, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, wp + k)));
      }
      int32_t unused;
      quant_row(y.data(), K, qp + m * K, sp + m, &unused);
    }
  });
  return {q, s};
}

// y [M, N] = acc * s * channel_scale + bias in out_dtype (epilogue of the _int_mm path).
at::Tensor epilogue(const at::Tensor& acc_in, const at::Tensor& xs, const at::Tensor& channel_scale,
                    const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  at::Tensor acc = acc_in.contiguous();
  TORCH_CHECK(acc.dtype() == at::kInt && acc.dim() == 2, "acc must be int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  at::Tensor sch = channel_scale.contiguous().to(at::kFloat);
  at::Tensor xsf = xs.contiguous().to(at::kFloat);
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  // fp32 results are written over the int32 accumulator, element for element (same size, each
  // read before its own write): no second M x N buffer to allocate and pull into the cache
  // (the callers' accumulator is a temporary). Other dtypes get a new tensor.
  at::Tensor out = out_dtype == at::kFloat && acc.is_same(acc_in) ? acc.view(at::kFloat)
                                                                  : at::empty({M, N}, acc.options().dtype(out_dtype));
  Epilogue e{sch.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr, out.data_ptr(), N, out_kind(out_dtype)};
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sp = xsf.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const __m512 sv = _mm512_set1_ps(sp[m]);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mk = mask16(N - n);
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mk, ap + m * N + n)), sv);
        y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mk, e.sch + n));
        if (e.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, e.bias + n));
        if (e.kind == 0)
          _mm512_mask_storeu_ps(static_cast<float*>(e.out) + m * N + n, mk, y);
        else
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + m * N + n, mk,
                                   e.kind == 1 ? cvt_bf16(y) : _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    }
  });
  return out;
}

// Dispatch rule (mirrored by cpu.use_packed_kernel): oneDNN's int8 GEMM wins for many
// tokens, but each call pays for unpacking W8 and reordering it (~K*N), which the packed
// kernel never does; the measured crossover grows with K. torch._int_mm is wrong for K == 1.
bool use_packed(int64_t M, int64_t K) { return K < 2 || M < std::max<int64_t>(16, std::min<int64_t>(K / 32, 128)); }
at::Tensor int_mm(const at::Tensor& a, const at::Tensor& w8) {
  if (a.size(1) == 1) return a.to(at::kInt).mul(w8.to(at::kInt).t());
  return at::_int_mm(a, w8.t());
}

}  // namespace qqq
