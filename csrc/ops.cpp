// Operator registration for the convrot CUDA extension (namespace `convrot`). Fake (meta) kernels live in
// convrot/kernels/__init__.py so torch.compile can trace through the ops.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "convrot.h"

namespace convrot {
namespace {

// config: -1 picks by shape, 0 = 128x256 tiles, 1 = 128x128 tiles (tests and the bench force each).
at::Tensor gemm_i8_sm90(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype, int64_t config) {
#ifndef CONVROT_SM90
  TORCH_CHECK(false, "convrot.gemm_i8_sm90: this build of the extension has no sm_90 GEMM");
#endif
  check_gemm_inputs("convrot.gemm_i8_sm90", a, a_scale, w, w_scale, bias, out_dtype, a.size(1));
  c10::cuda::CUDAGuard guard(a.device());
  const int M = (int)a.size(0), N = (int)w.size(0), K = (int)a.size(1);
  auto out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0) return out;
  const int small_m = config < 0 ? (M <= 1024) : (config == 1);
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* ap = a.data_ptr<int8_t>();
  auto* wp = w.data_ptr<int8_t>();
  auto* as = a_scale.data_ptr<float>();
  auto* ws = w_scale.data_ptr<float>();
  if (config >= 2) {
    TORCH_CHECK(out_dtype == at::kBFloat16 && config <= 5, "convrot.gemm_i8_sm90: configs 2-5 are bf16-only experiments");
    auto* fn = config == 2 ? gemm_i8_sm90_x2 : config == 3 ? gemm_i8_sm90_x3 : config == 4 ? gemm_i8_sm90_x4 : gemm_i8_sm90_x5;
    fn(ap, as, wp, ws, bp, out.data_ptr(), M, N, K, 0, stream, a.device());
    return out;
  }
  switch (out_dtype) {
    case at::kBFloat16: gemm_i8_sm90_bf16(ap, as, wp, ws, bp, out.data_ptr(), M, N, K, small_m, stream, a.device()); break;
    case at::kHalf: gemm_i8_sm90_f16(ap, as, wp, ws, bp, out.data_ptr(), M, N, K, small_m, stream, a.device()); break;
    default: gemm_i8_sm90_f32(ap, as, wp, ws, bp, out.data_ptr(), M, N, K, small_m, stream, a.device()); break;
  }
  return out;
}

}  // namespace
}  // namespace convrot

TORCH_LIBRARY(convrot, m) {
  m.def("rotate_quantize(Tensor x, int group_size) -> (Tensor, Tensor)");
  m.def("rotate_quantize_i8(Tensor x, int group_size) -> (Tensor, Tensor)");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  m.def(
      "gemm_s4_mma(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "gemm_i8_sm90(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
      "int config=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(convrot, CUDA, m) {
  m.impl("rotate_quantize", &convrot::rotate_quantize_packed);
  m.impl("rotate_quantize_i8", &convrot::rotate_quantize_int8);
  m.impl("unpack_int4", &convrot::unpack_int4);
  m.impl("gemm_s4_mma", &convrot::gemm_s4_mma);
  m.impl("gemm_i8_sm90", &convrot::gemm_i8_sm90);
}
