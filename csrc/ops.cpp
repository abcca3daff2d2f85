// Operator registration for the convrot CUDA extension (namespace `convrot`). Fake (meta) kernels live in
// convrot/kernels/__init__.py so torch.compile can trace through the ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "convrot.h"

namespace convrot {
namespace {

using GemmFn = void (*)(const int8_t*, const float*, const int8_t*, const float*, const void*, void*, int, int, int,
                        int, cudaStream_t, const at::Device&);

// config: 0 = Big (256x128), 1 = Small (128x128 ping-pong), 2 = StreamK (128x256); -1 picks by shape:
// Small for M <= 1024; StreamK when Big's tiles fill fewer than 8 waves and leave the last one under half full;
// else Big. Tests and the bench force each.
int pick_config(int M, int N, int sms) {
  if (M <= 1024) return 1;
  const double waves = (double)((M + 255) / 256) * ((N + 127) / 128) / sms;
  const double frac = waves - (int)waves;
  if (waves < 8 && frac > 0 && frac < 0.5) return 2;
  return 0;
}

at::Tensor gemm_i8_sm90(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype, int64_t config) {
#ifndef CONVROT_SM90
  TORCH_CHECK(false, "convrot.gemm_i8_sm90: this build of the extension has no sm_90 GEMM");
#endif
  check_gemm_inputs("convrot.gemm_i8_sm90", a, a_scale, w, w_scale, bias, out_dtype, a.size(1));
  TORCH_CHECK(config >= -1 && config <= 2, "convrot.gemm_i8_sm90: config must be -1, 0, 1 or 2");
  c10::cuda::CUDAGuard guard(a.device());
  const int M = (int)a.size(0), N = (int)w.size(0), K = (int)a.size(1);
  auto out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0) return out;
  const int cfg = config >= 0 ? (int)config : pick_config(M, N, convrot::sm_count());
  static const GemmFn table[3][3] = {
      {gemm_i8_sm90_bf16_big, gemm_i8_sm90_bf16_small, gemm_i8_sm90_bf16_sk},
      {gemm_i8_sm90_f16_big, gemm_i8_sm90_f16_small, gemm_i8_sm90_f16_sk},
      {gemm_i8_sm90_f32_big, gemm_i8_sm90_f32_small, gemm_i8_sm90_f32_sk},
  };
  const int dt = out_dtype == at::kBFloat16 ? 0 : out_dtype == at::kHalf ? 1 : 2;
  const void* bp = bias.has_value() ? bias->data_ptr() : nullptr;
  table[dt][cfg](a.data_ptr<int8_t>(), a_scale.data_ptr<float>(), w.data_ptr<int8_t>(), w_scale.data_ptr<float>(), bp,
                 out.data_ptr(), M, N, K, 0, c10::cuda::getCurrentCUDAStream(), a.device());
  return out;
}

}  // namespace
}  // namespace convrot

TORCH_LIBRARY(convrot, m) {
  m.def("rotate_quantize(Tensor x, int group_size) -> (Tensor, Tensor)");
  m.def("rotate_quantize_i8(Tensor x, int group_size) -> (Tensor, Tensor)");
  m.def("rotate_quantize_q8(Tensor x, int group_size) -> (Tensor, Tensor)");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  m.def("rotate_quantize_i8_unpack(Tensor x, int group_size, Tensor w_packed) -> (Tensor, Tensor, Tensor)");
  // `clamped` is a counter the kernel adds to (mutated in place)
  m.def(
      "rotate_quantize_i8_unpack_lora(Tensor x, int group_size, Tensor w_packed, Tensor h, Tensor pmul, Tensor q, "
      "Tensor(a!) clamped) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gemm_s4_mma(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "gemm_i8_sm90(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
      "int config=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(convrot, CUDA, m) {
  m.impl("rotate_quantize", &convrot::rotate_quantize_packed);
  m.impl("rotate_quantize_i8", &convrot::rotate_quantize_int8);
  m.impl("rotate_quantize_q8", &convrot::rotate_quantize_q8);
  m.impl("unpack_int4", &convrot::unpack_int4);
  m.impl("rotate_quantize_i8_unpack", &convrot::rotate_quantize_int8_unpack);
  m.impl("rotate_quantize_i8_unpack_lora", &convrot::rotate_quantize_int8_unpack_lora);
  m.impl("gemm_s4_mma", &convrot::gemm_s4_mma);
  m.impl("gemm_i8_sm90", &convrot::gemm_i8_sm90);
}
