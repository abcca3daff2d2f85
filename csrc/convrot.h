// Entry points shared by the translation units of the convrot CUDA extension.
#pragma once

#include <ATen/ATen.h>
// Not ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers, which a CPU build of torch plus a bare
// toolkit (the CI machine) does not have, and the kernels need only the stream and the SM count.
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <tuple>

namespace convrot {

// Multiprocessors of the current device, asked once per device.
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev);
  return cache[dev];
}

void check_rq_input(const at::Tensor& x, int64_t group_size);
std::tuple<at::Tensor, at::Tensor> rotate_quantize_packed(const at::Tensor& x, int64_t group_size);
std::tuple<at::Tensor, at::Tensor> rotate_quantize_int8(const at::Tensor& x, int64_t group_size);
std::tuple<at::Tensor, at::Tensor> rotate_quantize_q8(const at::Tensor& x, int64_t group_size);
at::Tensor unpack_int4(const at::Tensor& packed);
// rotate_quantize_int8 and unpack_int4(w_packed) in one launch (the per-call weight path of the sm_90 linear).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_quantize_int8_unpack(const at::Tensor& x, int64_t group_size,
                                                                           const at::Tensor& w_packed);
// The same with LoRA branches appended along K (see rotate_quant.cu): (a [M, K+R], a_scale, w [N, K+R]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_quantize_int8_unpack_lora(
    const at::Tensor& x, int64_t group_size, const at::Tensor& w_packed, const at::Tensor& h, const at::Tensor& pmul,
    const at::Tensor& q, const at::Tensor& clamped);

void check_gemm_inputs(const char* name, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                       int64_t k_per_row_a);

// mma.sync m16n8k64 s4 GEMM on packed codes (sm_80/86/89; runs emulated on sm_90, for tests only there).
at::Tensor gemm_s4_mma(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype);


// One translation unit per (output type, tile config) instantiation of the sm_90 GEMM (each compiles slowly).
// bias (in the output type) may be null; out is [M, N] contiguous.
#define CONVROT_DECL_X(NAME)                                                                                   \
  void NAME(const int8_t* a, const float* as, const int8_t* w, const float* ws, const void* bias, void* out,  \
            int M, int N, int K, int unused, cudaStream_t stream, const at::Device& dev);
CONVROT_DECL_X(gemm_i8_sm90_bf16_big)
CONVROT_DECL_X(gemm_i8_sm90_bf16_sk)
CONVROT_DECL_X(gemm_i8_sm90_bf16_small)
CONVROT_DECL_X(gemm_i8_sm90_f16_big)
CONVROT_DECL_X(gemm_i8_sm90_f16_sk)
CONVROT_DECL_X(gemm_i8_sm90_f16_small)
CONVROT_DECL_X(gemm_i8_sm90_f32_big)
CONVROT_DECL_X(gemm_i8_sm90_f32_sk)
CONVROT_DECL_X(gemm_i8_sm90_f32_small)

}  // namespace convrot
