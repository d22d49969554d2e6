// Entry points shared by the qqq CPU translation units (2-D, already validated inputs).
// The dispatcher-facing ops (validation, leading dims, registration) live in ops_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace qqq {

// parallel_cpu.cpp
// Which path a kernel call took (qqq_cpu::path_counts(), cpu.cpp_path_counts(); tests prove
// the fast path ran). kTeam/kSolo/kStall count parallel_items calls: run by the OpenMP team,
// run on the caller alone during a back-off, and team runs whose fork or join stalled;
// kAttnBf16 / kAttnF32: one-token attention over a bf16 / fp32 KV cache by the kernel (attention_cpu.cpp);
// kKron: an online Hadamard by kron_transform (hadamard_cpu.cpp); kAttnPrefill: attention of
// several query tokens by attention_prefill (attention_prefill_cpu.cpp); kHessianStage: GPTQ's
// bf16 Hessian staging (hessian_cpu.cpp); kAttnPrefillBf16: attention_prefill's bf16 dot products;
// kGptqBlock: GPTQ's column loop over one block of columns (gptq_cpu.cpp); kHessianGemm: GPTQ's
// Hessian sums from a bf16 chunk with fp32 accumulation (hessian_gemm_cpu.cpp).
enum Path { kW4Gemv, kW4GemmPacked, kW4IntMm, kW8Gemv, kW8GemmVnni, kW8IntMm, kTeam, kSolo, kStall, kAttnBf16, kAttnF32, kKron, kAttnPrefill, kHessianStage, kAttnPrefillBf16, kGptqBlock, kHessianGemm, kNumPaths };
void count_path(Path p);
std::vector<int64_t> path_counts();
// f(i, i + 1) for every item i in [0, n): items claimed by whichever team thread runs; on
// the calling thread alone when !parallel, and during a back-off after a stalled join.
void parallel_items(int64_t n, bool parallel, const std::function<void(int64_t, int64_t)>& f);
// The back-off rule, given how long a team call waited on other threads (fork + join; exposed
// for tests: a wait past the threshold puts the next calls on the caller alone).
void note_join_wait(int64_t waited_ns);
// Enable/disable the back-off (benchmarks compare with the always-team behaviour); returns
// the previous setting and clears any back-off in progress.
bool set_stall_backoff(bool enabled);

// act_cpu.cpp
// x [M, K] float/bf16/f16 -> (q int8 [M, K] natural or [M, Kp] permuted, s f32 [M], asum int32 [M]).
std::vector<at::Tensor> quantize(const at::Tensor& x, bool permute);
// Natural int8 [M, K] -> (permuted [M, Kp], asum int32 [M]).
std::vector<at::Tensor> permute_act(const at::Tensor& q);
// fp32 RMSNorm then per-token int8 (natural order): (q [M, K], s f32 [M]).
std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x, const at::Tensor& weight, double eps);
// y [M, N] = ((acc * s_tok) * s_ch) + bias in out_dtype, from an int32 accumulator. A
// contiguous acc is consumed: fp32 results are written over it (pass a temporary).
at::Tensor epilogue(const at::Tensor& acc, const at::Tensor& xs, const at::Tensor& channel_scale,
                    const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype);
// Exact int32 a [M, K] @ w8 [N, K].T (torch._int_mm, which is wrong on CPU when K == 1).
at::Tensor int_mm(const at::Tensor& a, const at::Tensor& w8);
// Whether M tokens take the VNNI GEMV/GEMM (else int8 unpack + oneDNN through _int_mm).
bool use_packed(int64_t M, int64_t K);

// w4a8_cpu.cpp
// Either x (float [M, K], quantized here) or xq/xs (int8 [M, K], f32 [M]) is defined.
at::Tensor w4a8_linear_2d(const at::Tensor& x, const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& qweight,
                          const at::Tensor& channel_scale, const c10::optional<at::Tensor>& group_scale,
                          const c10::optional<at::Tensor>& bias, int64_t group_size, at::ScalarType out_dtype);
at::Tensor gemm_packed(const at::Tensor& qperm, const at::Tensor& asum, const at::Tensor& xs, const at::Tensor& qweight,
                       const at::Tensor& channel_scale, const c10::optional<at::Tensor>& group_scale,
                       const c10::optional<at::Tensor>& bias, int64_t K, int64_t group_size, at::ScalarType out_dtype);
// W8 int8 [N, K] from the packed format, any group size.
at::Tensor unpack_w8(const at::Tensor& qweight, const c10::optional<at::Tensor>& group_scale, int64_t K,
                     int64_t group_size);

// w8a8_cpu.cpp
// x float [M, K], w8 int8 [N, K], scale f32 [N] -> [M, N] in x's dtype. path: -1 the rule
// below, 0 torch._int_mm, 1 the VNNI kernel (K < 2 always takes VNNI).
at::Tensor w8a8_linear_2d(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias, int64_t path = -1);
// Whether M tokens take the VNNI kernel rather than torch._int_mm (the rule for path -1).
bool use_packed_w8(int64_t M, int64_t K);

// attention_cpu.cpp
// SDPA of q [B, H, T, D] (fp32) over a bf16 KV cache: k_t [B, Hkv, D, L] (d-major), v
// [B, Hkv, L, D], bool mask broadcastable to [B, 1, T, L]; -> [B, H, T, D] laid out [B, T, H, D].
// T == 1 (head dim 16/32/64/128, up to 8 query heads per KV head) runs the decode kernel,
// other shapes torch's SDPA over the upcast cache.
at::Tensor attention_bf16kv(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, const at::Tensor& mask,
                            double scale);
// The same over an fp32 cache in SDPA's layout: k and v [B, Hkv, L, D].
at::Tensor attention_f32kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           double scale, bool bf16_dot);

// attention_prefill_cpu.cpp
// Whether attention_prefill covers these shapes: fp32 q [B, H, T, D], k and v [B, Hkv, L, D]
// (unit-stride rows; D 16/32/64/128; 1-8 query heads per KV head), a bool mask
// broadcastable to [B, 1, T, L].
bool prefill_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask);
// Masked SDPA of q over k/v with tiles the mask hides skipped -> [B, H, T, D] laid out [B, T, H, D].
// bf16_dot: both products in bf16 with fp32 sums where the CPU has AVX512-BF16 (else fp32).
at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                             double scale, bool bf16_dot);

// hadamard_cpu.cpp
// x [..., k] float32 times F1 ⊗ … ⊗ Fr (k = f1·…·fr): factors holds F1..Fr flattened, row-major [a, c].
// The KV-cache step's attention mask [B, 1, T, L] (bool) from the key validity [B, L] and the
// query positions [T] (kv_cache.py's rule; attention_cpu.cpp).
at::Tensor attention_mask(const at::Tensor& valid, const at::Tensor& pos);
// hessian_cpu.cpp: GPTQ's Hessian staging, dst bf16 [M, K or 2K] = [x | xf - x], x = q * scale
// (int8 [M, K], float32 [M]) or x float32 [M, K]; xf float32 or bfloat16 [M, K].
void hessian_stage(const at::Tensor& dst, const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& q,
                   const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& xf);
// hessian_gemm_cpu.cpp: sums float32 [K or 2K, K] ([H; D]) += products of the bf16 chunk a
// [M, K or 2K] = [X | ΔX] with fp32 accumulation: H's column slabs (width slab) down to each
// slab's end, D in full (d_upper: over the same region as H; h = false: D only; cols: a's
// columns read in this order); packed: an int32 scratch buffer of at least ceil(M/2) * W words.
void hessian_gemm(const at::Tensor& sums, const at::Tensor& a, const at::Tensor& packed, int64_t k, int64_t slab,
                  bool h, bool d_upper, const c10::optional<at::Tensor>& cols);
at::Tensor kron_transform(const at::Tensor& x, const at::Tensor& factors, at::IntArrayRef sizes);
// gptq_cpu.cpp: GPTQ's column loop over one block of B columns, rows in parallel. w [N, B]
// (updated in place), hinv and p [B, B] (p: GPTAQ's term, optional), table [G, N, C] (the
// decoded value of code qmin + c, per group and row), groups int64 [B]; writes q_out (codes),
// deq_out (their values) and err ((w - deq) / hinv_ii), each [N, B]. 2-D fp32, unit column stride.
void gptq_block(const at::Tensor& w, const at::Tensor& hinv, const c10::optional<at::Tensor>& p,
                const at::Tensor& table, const at::Tensor& groups, int64_t qmin, const at::Tensor& q_out,
                const at::Tensor& deq_out, const at::Tensor& err);

}  // namespace qqq
