// sm_90a int8 x int8 -> int32 GEMM (CUTLASS 3.x, wgmma, TMA, warp-specialized persistent) with the W4A4
// epilogue fused: out = (acc * a_scale[m]) * w_scale[n] + bias[n], cast to the output type.
// int4 codes are sign-extended to int8 before this kernel: wgmma has no 4-bit operand, and s4 mma.sync is
// emulated on sm_90 (KERNEL_FACTS.md: 18x slower).
//
// Included by one small .cu per (output type, tile config) so the slow CUTLASS instantiations compile in parallel.
// Without CONVROT_SM90 (a build for another architecture) the TU compiles to a stub that is never called.
#pragma once

#include "convrot.h"


#include <cstdlib>

#ifdef CONVROT_SM90
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace convrot {
namespace sm90 {

using namespace cute;
namespace fus = cutlass::epilogue::fusion;

template <class ElementD, class TileShape, class ClusterShape, class MainSchedule, class EpiSchedule,
          class Scheduler = void>
struct Config {
  using LayoutA = cutlass::layout::RowMajor;     // activations [M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // weights [N, K], K contiguous: the "TN" layout wgmma s8 needs
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // Tile-resident vectors: a_scale along M, w_scale and bias along N. Bias may be null (reads as 0). It is read
  // in the output's type (the layer's own bias dtype), so the call needs no cast kernel (~2 us at M = 512).
  using ScaleA = fus::Sm90ColBroadcast<0, TileShape, float, float>;
  using ScaleW = fus::Sm90RowBroadcast<0, TileShape, float, float>;
  using Bias = fus::Sm90RowBroadcast<0, TileShape, ElementD, float>;
  using MulA = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, float, float, kRound>, fus::Sm90AccFetch, ScaleA>;
  using MulW = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, float, float, kRound>, MulA, ScaleW>;
  using Evt = fus::Sm90EVT<fus::Sm90Compute<cutlass::plus, ElementD, float, kRound>, MulW, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpiSchedule, Evt>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, kAlignAB, int8_t, LayoutB, kAlignAB,
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Three tile configurations, picked from a sweep of six on the H100 (bench/NOTES.md, v2):
// Big: 256x128 tiles, 2-CTA clusters along N sharing the activation tile through TMA multicast.
template <class ElementD>
using Big = Config<ElementD, Shape<_256, _128, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                   cutlass::epilogue::TmaWarpSpecializedCooperative>;
// StreamK: 128x256 tiles split along K across CTAs when whole tiles leave the last wave mostly empty
// (4608x15360x3072: 432 tiles = 3.27 waves; 307 -> 267 us).
template <class ElementD>
using StreamK = Config<ElementD, Shape<_128, _256, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler>;
// Small: M ~ 512 (txt stream): 128x128 tiles, ping-pong warpgroups overlap one tile's epilogue with the next's MMAs.
template <class ElementD>
using Small = Config<ElementD, Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                     cutlass::epilogue::TmaWarpSpecialized>;

inline int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cached[device] == 0) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

template <class Cfg, class ElementD>
void run(const int8_t* a, const float* as, const int8_t* w, const float* ws, const void* bias, void* out, int M,
         int N, int K, cudaStream_t stream, const at::Device& dev) {
  using Gemm = typename Cfg::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  cutlass::KernelHardwareInfo hw;
  hw.device_id = dev.index();
  hw.sm_count = sm_count(dev.index());

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {a, cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, K, 1)), w,
       cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K, 1))},
      {{}, nullptr, cutlass::make_cute_packed_stride(StrideC{}, make_shape(M, N, 1)),
       reinterpret_cast<ElementD*>(out), cutlass::make_cute_packed_stride(StrideD{}, make_shape(M, N, 1))},
      hw};
  // Tile order: CUTLASS's heuristic and swizzle 1 unless the bench's sweep hooks ask otherwise
  // (CONVROT_GEMM_SWIZZLE = 1/2/4/8, CONVROT_GEMM_RASTER = 1 along M, 2 along N).
  using RO = decltype(args.scheduler.raster_order);
  if (const char* e = std::getenv("CONVROT_GEMM_SWIZZLE")) args.scheduler.max_swizzle_size = std::atoi(e);
  if (const char* e = std::getenv("CONVROT_GEMM_RASTER")) {
    const int r = std::atoi(e);
    args.scheduler.raster_order = r == 1 ? RO::AlongM : r == 2 ? RO::AlongN : RO::Heuristic;
  }
  // EVT arguments nest as {child args..., op args}.
  args.epilogue.thread = {
      {
          {{}, {as, 0.f, {}}, {}},  // acc * a_scale[m]
          {ws, 0.f, {}},            // * w_scale[n]
          {},
      },
      {reinterpret_cast<const ElementD*>(bias), ElementD(0), {}},  // + bias[n]
      {},
  };

  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "convrot.gemm_i8_sm90: CUTLASS cannot run M=", M,
              " N=", N, " K=", K, " (N must be a multiple of 8, K of 16)");
  const size_t ws_bytes = Gemm::get_workspace_size(args);
  // The workspace comes from PyTorch's allocator so the call stays capturable in a CUDA graph.
  at::Tensor workspace;
  if (ws_bytes) workspace = at::empty({(int64_t)ws_bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  TORCH_CHECK(gemm.initialize(args, ws_bytes ? workspace.data_ptr() : nullptr, stream) == cutlass::Status::kSuccess,
              "convrot.gemm_i8_sm90: CUTLASS initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "convrot.gemm_i8_sm90: CUTLASS launch failed: ",
              cudaGetErrorString(cudaGetLastError()));
}

}  // namespace sm90
}  // namespace convrot

#define CONVROT_SM90_ENTRY_X(NAME, ELEMENT, CFG)                                                                 \
  namespace convrot {                                                                                            \
  void NAME(const int8_t* a, const float* as, const int8_t* w, const float* ws, const void* bias, void* out,     \
            int M, int N, int K, int, cudaStream_t stream, const at::Device& dev) {                              \
    sm90::run<sm90::CFG<ELEMENT>, ELEMENT>(a, as, w, ws, bias, out, M, N, K, stream, dev);                       \
  }                                                                                                              \
  }

#else  // !CONVROT_SM90

#define CONVROT_SM90_ENTRY_X(NAME, ELEMENT, CFG)                                                                 \
  namespace convrot {                                                                                            \
  void NAME(const int8_t*, const float*, const int8_t*, const float*, const void*, void*, int, int, int, int,   \
            cudaStream_t, const at::Device&) {                                                                   \
    TORCH_CHECK(false, "convrot: this build has no sm_90 GEMM");                                                 \
  }                                                                                                              \
  }

#define CONVROT_SM90_ENTRY(NAME, ELEMENT)                                                                        \
  namespace convrot {                                                                                            \
  void NAME(const int8_t*, const float*, const int8_t*, const float*, const void*, void*, int, int, int, int,   \
            cudaStream_t, const at::Device&) {                                                                   \
    TORCH_CHECK(false, "convrot: this build has no sm_90 GEMM");                                                 \
  }                                                                                                              \
  }

#endif
