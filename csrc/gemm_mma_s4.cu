// W4A4 GEMM on packed int4 codes with mma.sync m16n8k64 s4 (native on sm_80/86/89), scales and bias fused.
// The packed checkpoint layout (low nibble = even k) is exactly the s4 operand layout, so both operands go
// from global memory to shared memory to registers untouched.
// On sm_90 the s4 instruction is emulated (KERNEL_FACTS.md: 71 TOPS); there this kernel only serves tests.
#include "convrot.h"

#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace convrot {
namespace {

constexpr int BM = 128, BN = 128;
constexpr int BKB = 64;        // bytes of K per tile (128 int4 codes)
constexpr int kRow = BKB + 16; // padded smem row: the 8 rows a fragment load touches hit distinct banks
constexpr int kThreads = 256;  // 8 warps: 2 along M (64 rows each) x 4 along N (32 cols each)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  const int bytes = valid ? 16 : 0;  // zero-fill rows and K past the end: zero codes add nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_0() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }

template <typename OutT>
__device__ __forceinline__ void store2(OutT* p, float x, float y);
template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
template <>
__device__ __forceinline__ void store2<__half>(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
template <>
__device__ __forceinline__ void store2<float>(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads) gemm_s4_kernel(const uint8_t* __restrict__ A, const float* __restrict__ as,
                                                           const uint8_t* __restrict__ B, const float* __restrict__ ws,
                                                           const OutT* __restrict__ bias, OutT* __restrict__ D,
                                                           int M, int N, int K) {
  __shared__ __align__(16) uint8_t sA[2][BM * kRow];
  __shared__ __align__(16) uint8_t sB[2][BN * kRow];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int kbytes = K / 2;
  const int ktiles = (kbytes + BKB - 1) / BKB;

  // Each stage is 128 rows x 4 16-byte pieces per operand: two pieces of A and two of B per thread.
  auto load_stage = [&](int stage, int kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 2, c = (idx & 3) * 16;
      const int kb = kt * BKB + c;
      const bool kin = kb < kbytes;
      const bool va = kin && (m0 + r) < M;
      const bool vb = kin && (n0 + r) < N;
      cp_async16(&sA[stage][r * kRow + c], va ? A + (int64_t)(m0 + r) * kbytes + kb : A, va);
      cp_async16(&sB[stage][r * kRow + c], vb ? B + (int64_t)(n0 + r) * kbytes + kb : B, vb);
    }
    cp_async_commit();
  };

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  load_stage(0, 0);
  for (int kt = 0; kt < ktiles; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < ktiles) {
      load_stage(cur ^ 1, kt + 1);
      cp_async_wait_1();
    } else {
      cp_async_wait_0();
    }
    __syncthreads();
    const uint8_t* a_s = sA[cur];
    const uint8_t* b_s = sB[cur];
#pragma unroll
    for (int ks = 0; ks < BKB; ks += 32) {  // one k64 mma step = 32 bytes
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r = wm * 64 + mt * 16 + g;
        af[mt][0] = *reinterpret_cast<const uint32_t*>(a_s + r * kRow + ks + tig * 4);
        af[mt][1] = *reinterpret_cast<const uint32_t*>(a_s + (r + 8) * kRow + ks + tig * 4);
        af[mt][2] = *reinterpret_cast<const uint32_t*>(a_s + r * kRow + ks + 16 + tig * 4);
        af[mt][3] = *reinterpret_cast<const uint32_t*>(a_s + (r + 8) * kRow + ks + 16 + tig * 4);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = wn * 32 + nt * 8 + g;
        bf[nt][0] = *reinterpret_cast<const uint32_t*>(b_s + n * kRow + ks + tig * 4);
        bf[nt][1] = *reinterpret_cast<const uint32_t*>(b_s + n * kRow + ks + 16 + tig * 4);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_s4(acc[mt][nt], af[mt], bf[nt]);
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int n = n0 + wn * 32 + nt * 8 + tig * 2;
    if (n >= N) continue;  // N % 8 == 0, so n + 1 < N too
    const float w0 = ws[n], w1 = ws[n + 1];
    const float b0 = bias ? to_f(bias[n]) : 0.f, b1 = bias ? to_f(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * 64 + mt * 16 + g + h * 8;
        if (m >= M) continue;
        const float s = as[m];
        // Explicit roundings, no FMA contraction: the same fp32 operations in the same order as the reference.
        store2<OutT>(D + (int64_t)m * N + n, __fadd_rn(__fmul_rn(__fmul_rn((float)acc[mt][nt][2 * h], s), w0), b0),
                     __fadd_rn(__fmul_rn(__fmul_rn((float)acc[mt][nt][2 * h + 1], s), w1), b1));
      }
    }
  }
}

}  // namespace

void check_gemm_inputs(const char* name, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                       int64_t k_per_row_a) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a_scale.is_cuda() && w_scale.is_cuda(), name, ": tensors must be on CUDA");
  TORCH_CHECK(a.scalar_type() == at::kChar && w.scalar_type() == at::kChar, name, ": codes must be int8 tensors");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.is_contiguous() && w.is_contiguous(), name,
              ": codes must be contiguous 2-D tensors");
  TORCH_CHECK(a.size(1) == w.size(1), name, ": K mismatch, a has ", a.size(1), " per row, w has ", w.size(1));
  TORCH_CHECK(k_per_row_a % 64 == 0, name, ": K=", k_per_row_a, " must be a multiple of 64");
  TORCH_CHECK(w.size(0) % 8 == 0, name, ": N=", w.size(0), " must be a multiple of 8");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat && a_scale.is_contiguous() &&
                  w_scale.is_contiguous(),
              name, ": scales must be contiguous float32");
  TORCH_CHECK(a_scale.numel() == a.size(0) && w_scale.numel() == w.size(0), name, ": scale sizes must be [M] and [N]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == out_dtype && bias->is_contiguous() &&
                    bias->numel() == w.size(0),
                name, ": bias must be a contiguous [N] CUDA tensor of the output dtype (the Python wrapper casts it)");
  }
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat, name,
              ": out_dtype must be bfloat16, float16 or float32");
}

at::Tensor gemm_s4_mma(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_gemm_inputs("convrot.gemm_s4_mma", a, a_scale, w, w_scale, bias, out_dtype, a.size(1) * 2);
  c10::cuda::CUDAGuard guard(a.device());
  const int M = (int)a.size(0), N = (int)w.size(0), K = (int)a.size(1) * 2;
  auto out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0) return out;
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* ap = reinterpret_cast<const uint8_t*>(a.data_ptr());
  auto* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const void* bp = bias.has_value() ? bias->data_ptr() : nullptr;
  switch (out_dtype) {
    case at::kBFloat16:
      gemm_s4_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(ap, a_scale.data_ptr<float>(), wp,
                                                                  w_scale.data_ptr<float>(),
                                                                  static_cast<const __nv_bfloat16*>(bp),
                                                                  reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), M,
                                                                  N, K);
      break;
    case at::kHalf:
      gemm_s4_kernel<__half><<<grid, kThreads, 0, stream>>>(ap, a_scale.data_ptr<float>(), wp,
                                                           w_scale.data_ptr<float>(), static_cast<const __half*>(bp),
                                                           reinterpret_cast<__half*>(out.data_ptr()), M, N, K);
      break;
    default:
      gemm_s4_kernel<float><<<grid, kThreads, 0, stream>>>(ap, a_scale.data_ptr<float>(), wp,
                                                          w_scale.data_ptr<float>(), static_cast<const float*>(bp), out.data_ptr<float>(), M, N,
                                                          K);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace convrot
