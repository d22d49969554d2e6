// The torch.ops.qqq.* CPU kernels as dispatcher registrations (TORCH_LIBRARY_IMPL), so that
// AOTInductor's generated C++ (and every other caller) reaches them without Python.
//
// The schemas are defined in Python (qqq_compile/kernels/ops.py, torch.library.define); this
// library only adds CPU implementations. Each op validates its inputs exactly like the Python
// implementations do, with the same messages, and raises c10::ValueError (ValueError in
// Python) via TORCH_CHECK_VALUE.
//
// The same kernels are also ops of their own namespace, qqq_cpu::* (schemas inferred from the
// C++ signatures), so Python can call the C++ kernel explicitly: the qqq::* reference kernel
// does so on the very first CPU call, the one that loads this library. qqq_cpu::call_counts()
// returns how often each kernel ran (diagnostics: tests use it to prove the C++ kernel ran,
// e.g. inside an AOTInductor package). No pybind: the library is a plain shared object loaded
// with torch.ops.load_library, which keeps the build light.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <sstream>
#include <string>

#include "qqq_cpu.h"

namespace qqq {
namespace {

// ---------------------------------------------------------------- call counters

enum Op { kQuantizeAct, kRmsnormQuant, kW4A8Linear, kW4A8LinearQ, kW8A8Linear, kNumOps };
std::array<std::atomic<int64_t>, kNumOps> g_calls{};

void count(Op op) { g_calls[op].fetch_add(1, std::memory_order_relaxed); }

// ---------------------------------------------------------------- Python-style messages

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py_tuple(c10::IntArrayRef s) {  // Python's repr of a tuple of ints
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

std::string py_tensor(const at::Tensor& t) { return py_dtype(t.scalar_type()) + " " + py_tuple(t.sizes()); }

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// ---------------------------------------------------------------- validation (mirrors ops.py)

void check_float(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(is_float(x.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) != 0, name, " must have a non-empty last dimension, got shape ",
                    py_tuple(x.sizes()));
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_float(x);
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == k && is_float(weight.scalar_type()),
                    "weight must be a float tensor of shape (", k, ",), got ", py_tensor(weight));
}

int64_t check_weight_args(int64_t k, const at::Tensor& qweight, const at::Tensor& channel_scale,
                          const c10::optional<at::Tensor>& group_scale, const c10::optional<at::Tensor>& bias,
                          int64_t group_size) {
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 2,
                    "qweight must be a 2-D uint8 tensor, got ", py_tensor(qweight));
  const int64_t n = qweight.size(0);
  TORCH_CHECK_VALUE(qweight.size(1) == (k + 1) / 2, "qweight has ", qweight.size(1), " bytes per row; K=", k,
                    " needs ", (k + 1) / 2);
  TORCH_CHECK_VALUE(channel_scale.scalar_type() == at::kFloat && channel_scale.dim() == 1 && channel_scale.size(0) == n,
                    "channel_scale must be float32 of shape (", n, ",), got ", py_tensor(channel_scale));
  TORCH_CHECK_VALUE((group_size > 0) == group_scale.has_value(), "group_scale must be given exactly when group_size > 0");
  if (group_scale.has_value()) {
    const at::Tensor& gs = *group_scale;
    TORCH_CHECK_VALUE(gs.scalar_type() == at::kChar || gs.scalar_type() == at::kHalf,
                      "group_scale must be int8 or float16, got ", py_dtype(gs.scalar_type()));
    const int64_t g = (k + group_size - 1) / group_size;
    TORCH_CHECK_VALUE(gs.dim() == 2 && gs.size(0) == n && gs.size(1) == g, "group_scale must have shape (", n, ", ", g,
                      "), got ", py_tuple(gs.sizes()));
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()) && b.dim() == 1 && b.size(0) == n,
                      "bias must be a float tensor of shape (", n, ",), got ", py_tensor(b));
  }
  return n;
}

void check_act_args(const at::Tensor& xq, const at::Tensor& xs) {
  TORCH_CHECK_VALUE(xq.scalar_type() == at::kChar && xq.dim() >= 1, "xq must be an int8 tensor [..., K], got ",
                    py_tensor(xq));
  std::vector<int64_t> want(xq.sizes().begin(), xq.sizes().end() - 1);
  want.push_back(1);
  TORCH_CHECK_VALUE(xs.scalar_type() == at::kFloat && xs.sizes().vec() == want, "xscale must be float32 of shape ",
                    py_tuple(want), ", got ", py_tensor(xs));
}

void check_out_dtype(at::ScalarType t) {
  TORCH_CHECK_VALUE(is_float(t), "out_dtype must be one of (torch.float16, torch.bfloat16, torch.float32), got ",
                    py_dtype(t));
}

int64_t check_w8_args(int64_t k, const at::Tensor& w8, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(w8.scalar_type() == at::kChar && w8.dim() == 2 && w8.size(1) == k,
                    "w8 must be a 2-D int8 tensor of shape (N, ", k, "), got ", py_tensor(w8));
  const int64_t n = w8.size(0);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == n,
                    "scale must be float32 of shape (", n, ",), got ", py_tensor(scale));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()) && b.dim() == 1 && b.size(0) == n,
                      "bias must be a float tensor of shape (", n, ",), got ", py_tensor(b));
  }
  return n;
}

// ---------------------------------------------------------------- ops: [..., K] in, leading dims kept

std::vector<int64_t> with_last(c10::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_act_op(const at::Tensor& x) {
  count(kQuantizeAct);
  check_float(x);
  const int64_t K = x.size(-1);
  std::vector<at::Tensor> r = quantize(x.reshape({-1, K}), false);
  return {r[0].view(x.sizes()), r[1].view(with_last(x.sizes(), 1))};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_quant_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  count(kRmsnormQuant);
  check_norm(x, weight);
  const int64_t K = x.size(-1);
  std::vector<at::Tensor> r = rmsnorm_quant(x.reshape({-1, K}), weight, eps);
  return {r[0].view(x.sizes()), r[1].view(with_last(x.sizes(), 1))};
}

at::Tensor w4a8_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& channel_scale,
                          const c10::optional<at::Tensor>& group_scale, const c10::optional<at::Tensor>& bias,
                          int64_t group_size) {
  count(kW4A8Linear);
  check_float(x);
  const int64_t K = x.size(-1);
  const int64_t N = check_weight_args(K, qweight, channel_scale, group_scale, bias, group_size);
  // One C++ call: quantize (straight into the kernel's layout) + GEMM + epilogue.
  at::Tensor y = w4a8_linear_2d(x.reshape({-1, K}), at::Tensor(), at::Tensor(), qweight, channel_scale, group_scale,
                                bias, group_size, x.scalar_type());
  return y.view(with_last(x.sizes(), N));
}

at::Tensor w4a8_linear_q_op(const at::Tensor& xq, const at::Tensor& xscale, const at::Tensor& qweight,
                            const at::Tensor& channel_scale, const c10::optional<at::Tensor>& group_scale,
                            const c10::optional<at::Tensor>& bias, int64_t group_size, at::ScalarType out_dtype) {
  count(kW4A8LinearQ);
  check_act_args(xq, xscale);
  const int64_t K = xq.size(-1);
  const int64_t N = check_weight_args(K, qweight, channel_scale, group_scale, bias, group_size);
  check_out_dtype(out_dtype);
  at::Tensor y = w4a8_linear_2d(at::Tensor(), xq.reshape({-1, K}), xscale.reshape({-1}), qweight, channel_scale,
                                group_scale, bias, group_size, out_dtype);
  return y.view(with_last(xq.sizes(), N));
}

// path: -1 the dispatch rule, 0 torch._int_mm, 1 the VNNI kernel (qqq_cpu::w8a8_linear_path,
// for tests and benchmarks of both paths at any M).
at::Tensor w8a8_linear_path_op(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias, int64_t path) {
  count(kW8A8Linear);
  check_float(x);
  const int64_t K = x.size(-1);
  const int64_t N = check_w8_args(K, w8, scale, bias);
  at::Tensor y = w8a8_linear_2d(x.reshape({-1, K}), w8, scale, bias, path);
  return y.view(with_last(x.sizes(), N));
}

at::Tensor w8a8_linear_op(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  return w8a8_linear_path_op(x, w8, scale, bias, -1);
}

}  // namespace
}  // namespace qqq

TORCH_LIBRARY_IMPL(qqq, CPU, m) {
  m.impl("quantize_act", &qqq::quantize_act_op);
  m.impl("rmsnorm_quant", &qqq::rmsnorm_quant_op);
  m.impl("w4a8_linear", &qqq::w4a8_linear_op);
  m.impl("w4a8_linear_q", &qqq::w4a8_linear_q_op);
  m.impl("w8a8_linear", &qqq::w8a8_linear_op);
}

std::vector<int64_t> call_counts() {  // in the order of qqq::Op (cpu.OP_NAMES)
  std::vector<int64_t> out;
  for (int i = 0; i < qqq::kNumOps; ++i) out.push_back(qqq::g_calls[i].load());
  return out;
}

TORCH_LIBRARY(qqq_cpu, m) {
  m.def("quantize_act", &qqq::quantize_act_op);
  m.def("rmsnorm_quant", &qqq::rmsnorm_quant_op);
  m.def("w4a8_linear", &qqq::w4a8_linear_op);
  m.def("w4a8_linear_q", &qqq::w4a8_linear_q_op);
  m.def("w8a8_linear", &qqq::w8a8_linear_op);
  m.def("call_counts", &call_counts);
  m.def("path_counts", &qqq::path_counts);
  m.def("note_join_wait", &qqq::note_join_wait);
  m.def("set_stall_backoff", &qqq::set_stall_backoff);
  // Schema only (the CPU kernel below; the fake is registered from Python, cpu.py): a
  // catch-all kernel would be traced through, with fake tensors, by torch.export.
  m.def("attention_bf16kv(Tensor q, Tensor k_t, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("attention_f32kv(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, bool bf16_dot=False) -> Tensor");
  m.def("kron_transform(Tensor x, Tensor factors, int[] sizes) -> Tensor");
  m.def("attention_mask(Tensor valid, Tensor cache_position) -> Tensor");
  // 2-D building blocks, for tests and benchmarks.
  m.def("unpack_w8", &qqq::unpack_w8);
  m.def("hessian_stage", &qqq::hessian_stage);
  m.def("gptq_block", &qqq::gptq_block);
  m.def("hessian_gemm(Tensor sums, Tensor a, Tensor packed, int k, int slab, bool h=True, bool d_upper=False, Tensor? cols=None) -> ()",
        &qqq::hessian_gemm);
  m.def("use_packed", &qqq::use_packed);
  m.def("use_packed_w8", &qqq::use_packed_w8);
  m.def("w8a8_linear_path", &qqq::w8a8_linear_path_op);
}

TORCH_LIBRARY_IMPL(qqq_cpu, CPU, m) {
  m.impl("attention_bf16kv", &qqq::attention_bf16kv);
  m.impl("attention_f32kv", &qqq::attention_f32kv);
  m.impl("kron_transform", &qqq::kron_transform);
  m.impl("attention_mask", &qqq::attention_mask);
}

// ---------------------------------------------------------------- AOTInductor C shims
//
// An AOTInductor package calls a custom op through its proxy executor: per call an IValue
// stack built from the op's serialized schema, a dispatcher lookup and a boxed call. The
// decode step makes ~180 such calls per token (4 linears, attention and a Hadamard per layer),
// and that bookkeeping ran on the main thread while the other core waited. Packages built with
// these functions named in ``aot_inductor.custom_ops_to_c_shims`` (runtime/aot_build.py;
// the declarations, which must match these signatures, are cpu.AOTI_SHIMS) call them directly
// instead. The library is made RTLD_GLOBAL when it loads (cpu.py), so a package's undefined
// symbols resolve to these. Argument conventions are AOTInductor's: Tensor -> AtenTensorHandle,
// Tensor? -> AtenTensorHandle* (nullptr for None), int -> int64_t, bool and ScalarType -> int32_t,
// float -> double, int[] -> pointer and length; the result through AtenTensorHandle* ret0.

#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace {

using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::pointer_to_optional;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;

const at::Tensor& T(AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); }

}  // namespace

extern "C" {

AOTITorchError aoti_torch_cpu_w4a8_linear(AtenTensorHandle x, AtenTensorHandle qweight, AtenTensorHandle channel_scale,
                                          AtenTensorHandle* group_scale, AtenTensorHandle* bias, int64_t group_size,
                                          AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(qqq::w4a8_linear_op(T(x), T(qweight), T(channel_scale),
                                                  pointer_to_optional<at::Tensor>(group_scale),
                                                  pointer_to_optional<at::Tensor>(bias), group_size));
  });
}

AOTITorchError aoti_torch_cpu_w4a8_linear_q(AtenTensorHandle xq, AtenTensorHandle xscale, AtenTensorHandle qweight,
                                            AtenTensorHandle channel_scale, AtenTensorHandle* group_scale,
                                            AtenTensorHandle* bias, int64_t group_size, int32_t out_dtype,
                                            AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(qqq::w4a8_linear_q_op(T(xq), T(xscale), T(qweight), T(channel_scale),
                                                    pointer_to_optional<at::Tensor>(group_scale),
                                                    pointer_to_optional<at::Tensor>(bias), group_size,
                                                    static_cast<at::ScalarType>(out_dtype)));
  });
}

AOTITorchError aoti_torch_cpu_w8a8_linear(AtenTensorHandle x, AtenTensorHandle w8, AtenTensorHandle scale,
                                          AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(qqq::w8a8_linear_op(T(x), T(w8), T(scale), pointer_to_optional<at::Tensor>(bias)));
  });
}

AOTITorchError aoti_torch_cpu_attention_f32kv(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                              AtenTensorHandle mask, double scale, int32_t bf16_dot,
                                              AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
      { *ret0 = new_tensor_handle(qqq::attention_f32kv(T(q), T(k), T(v), T(mask), scale, bf16_dot != 0)); });
}

AOTITorchError aoti_torch_cpu_attention_bf16kv(AtenTensorHandle q, AtenTensorHandle k_t, AtenTensorHandle v,
                                               AtenTensorHandle mask, double scale, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
      { *ret0 = new_tensor_handle(qqq::attention_bf16kv(T(q), T(k_t), T(v), T(mask), scale)); });
}

AOTITorchError aoti_torch_cpu_kron_transform(AtenTensorHandle x, AtenTensorHandle factors, const int64_t* sizes,
                                             int64_t sizes_len, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
      { *ret0 = new_tensor_handle(qqq::kron_transform(T(x), T(factors), at::IntArrayRef(sizes, sizes_len))); });
}

AOTITorchError aoti_torch_cpu_attention_mask(AtenTensorHandle valid, AtenTensorHandle pos, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret0 = new_tensor_handle(qqq::attention_mask(T(valid), T(pos))); });
}

}  // extern "C"
