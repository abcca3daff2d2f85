// One pass over an activation (or weight) matrix: block-diagonal regular Hadamard in fp32 registers,
// per-row absmax, symmetric int4 codes written packed (two per byte) or as int8 (what the sm_90 GEMM reads).
//
// Regular Hadamard of size 4^k = D * P * S * D with S the Sylvester (Walsh-Hadamard) matrix,
// D = diag(-1 for every base-4 digit of the index equal to 3) and P swapping the two bits of each base-4 digit.
// So: sign the input, run a plain FWHT butterfly, sign again, and write element p to position P(p).
// Each thread holds 16 consecutive elements of a group (two base-4 digits), so the lower digits are a
// register permutation and the upper digits (which thread of the group) only change the store address.
#include "convrot.h"

#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

namespace convrot {
namespace {

constexpr int kChunk = 16;  // elements per thread per chunk

template <typename T>
struct Loader;

template <>
struct Loader<__nv_bfloat16> {
  static constexpr int kVec = 2;  // 16-byte loads per chunk
  __device__ static void cvt(const uint4 (&raw)[kVec], float (&v)[kChunk]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Loader<__half> {
  static constexpr int kVec = 2;
  __device__ static void cvt(const uint4 (&raw)[kVec], float (&v)[kChunk]) {
    const __half2* h = reinterpret_cast<const __half2*>(raw);
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Loader<float> {
  static constexpr int kVec = 4;
  __device__ static void cvt(const uint4 (&raw)[kVec], float (&v)[kChunk]) {
    const float* f = reinterpret_cast<const float*>(raw);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = f[i];
  }
};

// -1 where an odd number of base-4 digits of e (4 bits: two digits) equal 3.
__host__ __device__ constexpr float digit3_sign(int e) {
  return (((e & 3) == 3) ^ (((e >> 2) & 3) == 3)) ? -1.f : 1.f;
}
// Swap the two bits inside every base-4 digit.
__host__ __device__ constexpr int swap_digit_bits(int e) {
  return ((e & 0x55555555) << 1) | ((e >> 1) & 0x55555555);
}

// Packed int4 -> int8 codes: 8 bytes in, 16 bytes out per item, so consecutive lanes read and write consecutive
// addresses (v3 read 16 and wrote 2x16 strided by 32 bytes: 55% of copy bandwidth). kUnroll independent loads
// per thread keep enough bytes in flight.
constexpr int kUnroll = 8;
__device__ __forceinline__ uint4 expand8(const uint2 p) {
  const uint32_t pw[2] = {p.x, p.y};
  uint32_t o[4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // Sign-extend each nibble to a byte with SIMD byte arithmetic: (n ^ 8) - 8, no borrow across bytes.
    const uint32_t lo = __vsub4((pw[h] & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
    const uint32_t hi = __vsub4(((pw[h] >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
    o[2 * h] = __byte_perm(lo, hi, 0x5140);      // lo0 hi0 lo1 hi1: even k in the lower byte
    o[2 * h + 1] = __byte_perm(lo, hi, 0x7362);  // lo2 hi2 lo3 hi3
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// The same, each code times 16 (the nibble moved to the high half of its byte): the weight side of the LoRA
// extension below, where finer accumulator units leave room for the appended low-rank codes.
__device__ __forceinline__ uint4 expand8_x16(const uint2 p) {
  const uint32_t pw[2] = {p.x, p.y};
  uint32_t o[4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = (pw[h] << 4) & 0xF0F0F0F0u;  // even codes * 16
    const uint32_t hi = pw[h] & 0xF0F0F0F0u;         // odd codes * 16
    o[2 * h] = __byte_perm(lo, hi, 0x5140);
    o[2 * h + 1] = __byte_perm(lo, hi, 0x7362);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// Where the weight expansion writes: rows of `kpr` 16-code items at a pitch of `ld` items (ld == kpr: contiguous),
// plain sign extension or times 16.
// `tail` (optional): R int8 codes per row copied after the row's K codes (the LoRA extension's q).
struct WeightOut {
  uint4* out = nullptr;
  int64_t kpr = 1, ld = 1;
  bool x16 = false;
  const int8_t* tail = nullptr;
  int R = 0;
};

__device__ __forceinline__ void expand_store(const WeightOut& wo, int64_t i, const uint2 p) {
  const int64_t o = wo.ld == wo.kpr ? i : (i / wo.kpr) * wo.ld + i % wo.kpr;
  wo.out[o] = wo.x16 ? expand8_x16(p) : expand8(p);
  if (wo.tail != nullptr && i % wo.kpr == wo.kpr - 1) {  // the row's last item also copies its tail (R % 16 == 0)
    const int64_t row = i / wo.kpr;
    const uint4* src = reinterpret_cast<const uint4*>(wo.tail + row * wo.R);
    for (int j = 0; j < wo.R / 16; ++j) wo.out[o + 1 + j] = __ldg(src + j);
  }
}

// One block's share of the weight expansion: kUnroll independent loads per thread, then the stores. Used by the
// standalone kernel and by the weight blocks of the fused rotate-quantize launch.
__device__ __forceinline__ void expand_block(const uint2* __restrict__ in, const WeightOut& wo, int64_t n8,
                                             int64_t block) {
  const int64_t base = block * blockDim.x * kUnroll + threadIdx.x;
  uint2 p[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + (int64_t)u * blockDim.x;
    p[u] = i < n8 ? __ldg(in + i) : make_uint2(0, 0);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + (int64_t)u * blockDim.x;
    if (i < n8) expand_store(wo, i, p[u]);
  }
}

__global__ void unpack_int4_kernel(const uint2* __restrict__ in, WeightOut wo, int64_t n8) {
  expand_block(in, wo, n8, blockIdx.x);
}

// The LoRA extension of the int8 activation path (see rotate_quantize_int8_unpack_lora): codes written at a row
// pitch of `ld` (K + R) and shifted left by `shift` bits (2: times 4), then R appended codes per row from the
// low-rank activations h [M, R]: round(h * pmul[r] / scale[row]) clamped to +-127 (clamps counted in *clamped).
template <typename T>
struct ActExt {
  int64_t ld = 0;  // 0: plain rows of K codes
  uint32_t shift = 0;
  const T* h = nullptr;
  const float* pmul = nullptr;
  int R = 0;
  int* clamped = nullptr;
};

// CPT chunks per thread, strided by the number of active threads so each chunk sweep is one coalesced pass
// and the G/16 threads sharing a group are consecutive lanes of one warp.
// Blocks are persistent over rows and load row i+1 into registers before working on row i: v1 (one block per
// row) left each block's loads idle through its reduction and stores and reached only 41% of copy bandwidth.
template <typename T, int G, int CPT, bool kPacked, bool kPrefetch>
__global__ void __launch_bounds__(CPT <= 2 ? 1024 : 512)
    rotate_quantize_kernel(const T* __restrict__ x, int8_t* __restrict__ out, float* __restrict__ scale, int64_t M,
                           int K, int active, int act_grid, const uint2* __restrict__ wp, WeightOut wout,
                           int64_t wn8, float qmax, ActExt<T> ext) {
  // Blocks past act_grid sign-extend a packed weight instead (the fused per-call path of w4a4_linear): one launch
  // instead of two, and the weight's bandwidth-bound blocks fill the SMs while short activation rows wait on
  // their reductions.
  if ((int)blockIdx.x >= act_grid) {
    expand_block(wp, wout, wn8, (int64_t)blockIdx.x - act_grid);
    return;
  }
  constexpr int kLanesPerGroup = G / kChunk;  // 1, 4 or 16
  using L = Loader<T>;
  const int t = threadIdx.x;
  const bool live = t < active;
  const int q = t % kLanesPerGroup;  // which 16-element piece of the group this thread holds
  // Sign of the upper (thread-level) digits; the lower two digits are compile-time per element.
  float tsign = 1.f;
  if (kLanesPerGroup >= 4) tsign *= ((q & 3) == 3) ? -1.f : 1.f;
  if (kLanesPerGroup >= 16) tsign *= (((q >> 2) & 3) == 3) ? -1.f : 1.f;
  const int qdst = swap_digit_bits(q);
  __shared__ float red[2][32];

  auto load_row = [&](int64_t row, uint4 (&raw)[CPT][L::kVec]) {
    const T* xr = x + row * K;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const uint4* src = reinterpret_cast<const uint4*>(xr + (int64_t)(j * active + t) * kChunk);
#pragma unroll
      for (int v = 0; v < L::kVec; ++v) raw[j][v] = (live && row < M) ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
    }
  };

  uint4 raw[CPT][L::kVec];
  int64_t row = blockIdx.x;
  load_row(row, raw);
  for (int it = 0; row < M; row += act_grid, ++it) {
    // Persistent blocks prefetch the next row; one-row blocks skip it and its 8+ registers (ncu, v5: 61-64
    // registers held occupancy to 5 blocks of 192 threads = 47% at K = 3072).
    uint4 nxt[CPT][L::kVec];
    if (kPrefetch) load_row(row + act_grid, nxt);  // in flight while this row is reduced and stored

    // v3 spent ~37 instructions per element and was issue-bound (45% of copy bandwidth). v4 trims it to ~18:
    // input signs folded into the first butterfly, output signs and 1/sqrt(G) folded into the quantization
    // multiplier, one FFMA per cross-lane butterfly, no division, no clamp, a float-magic rounding.
    float v[CPT][kChunk];
    float amax = 0.f;
    const float lane_sign[4] = {(q & 1) ? -1.f : 1.f, (q & 2) ? -1.f : 1.f, (q & 4) ? -1.f : 1.f, (q & 8) ? -1.f : 1.f};
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      L::cvt(raw[j], v[j]);
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        if (digit3_sign(e) < 0.f) v[j][e] = -v[j][e];  // compile-time: becomes a negated operand of the next add
#pragma unroll
      for (int h = 1; h < kChunk; h <<= 1) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if ((e & h) == 0) {
            float a = v[j][e], b = v[j][e + h];
            v[j][e] = a + b;
            v[j][e + h] = a - b;
          }
        }
      }
      if (kLanesPerGroup > 1) {
        // The thread-level input sign commutes with the in-thread butterflies, so it can come after them.
#pragma unroll
        for (int e = 0; e < kChunk; ++e) v[j][e] *= tsign;
      }
#pragma unroll
      for (int l = 0; (1 << l) < kLanesPerGroup; ++l) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const float other = __shfl_xor_sync(0xffffffffu, v[j][e], 1 << l);
          v[j][e] = fmaf(v[j][e], lane_sign[l], other);  // lower lane: v + other; upper lane: other - v
        }
      }
#pragma unroll
      for (int e = 0; e < kChunk; ++e) amax = fmaxf(amax, fabsf(v[j][e]));
    }

    // Row absmax: warp shuffle, then one slot per warp. Two buffers alternate between rows: a thread can
    // only reach row i+2's writes after every thread passed row i+1's first barrier, i.e. read row i's result.
    float* rb = red[it & 1];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((t & 31) == 0) rb[t >> 5] = amax;
    __syncthreads();
    // 1/sqrt(G) is a power of two, so |r| = |v| * kNorm exactly and amax matches the reference's bit for bit;
    // then the reference's clamp and IEEE division by 7. One thread divides and shares s and 1/s (v5 had every
    // thread repeat both divisions: ~2.5 instructions per element).
    constexpr float kNorm = G == 16 ? 0.25f : (G == 64 ? 0.125f : 0.0625f);
    if (t < 32) {
      float m = t < (int)(blockDim.x >> 5) ? rb[t] : 0.f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (t == 0) {
        const float sc = __fdiv_rn(fmaxf(m * kNorm, 1e-10f), qmax);  // 7 (int4 codes) or 127 (W8A8)
        scale[row] = sc;
        rb[0] = sc;
        rb[1] = kNorm * __frcp_rn(sc);
      }
    }
    __syncthreads();
    // code = round_half_even(r / s) with r = sign * kNorm * v. r * (1/s) differs from r / s by about an ulp, which
    // changes a code only when r / s is within ~2^-21 of a half-integer. |r| <= amax makes |r / s| <= 7 (+ulps),
    // which still rounds to 7: the reference's clamp never acts. fma(v, m, 1.5 * 2^23) rounds to an integer held in
    // the low mantissa bits, so the code is the low byte of the float's bit pattern.
    const float mpos = tsign * rb[1];
    constexpr float kMagic = 12582912.f;
    const int64_t ld = kPacked ? K / 2 : (ext.ld ? ext.ld : K);
    if (!kPacked && ext.R) {
      const float inv = 1.f / rb[0];
      for (int r = t; r < ext.R; r += blockDim.x) {
        float c = rintf(static_cast<float>(ext.h[row * ext.R + r]) * ext.pmul[r] * inv);
        if (fabsf(c) > 127.f) {
          atomicAdd(ext.clamped, 1);
          c = fminf(fmaxf(c, -127.f), 127.f);
        }
        out[row * ld + K + r] = static_cast<int8_t>(c);
      }
    }

    if (live) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t chunk = (int64_t)(j * active + t) - q + qdst;
        uint32_t y[kChunk];
#pragma unroll
        for (int e = 0; e < kChunk; ++e)
          y[swap_digit_bits(e)] = __float_as_uint(__fmaf_rn(v[j][e], digit3_sign(e) < 0.f ? -mpos : mpos, kMagic));
        uint32_t w[4];  // int8 codes, even k in the lower byte
#pragma unroll
        for (int h = 0; h < 4; ++h)
          w[h] = __byte_perm(__byte_perm(y[4 * h], y[4 * h + 1], 0x0040), __byte_perm(y[4 * h + 2], y[4 * h + 3], 0x0040),
                             0x5410);
        if constexpr (kPacked) {
          uint32_t n[4];
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const uint32_t m = w[h] & 0x0F0F0F0Fu;
            n[h] = m | (m >> 4);  // byte 0 = c0 | c1 << 4, byte 2 = c2 | c3 << 4
          }
          reinterpret_cast<uint2*>(out + row * ld)[chunk] =
              make_uint2(__byte_perm(n[0], n[1], 0x6420), __byte_perm(n[2], n[3], 0x6420));
        } else {
          if (ext.shift) {  // codes in [-7, 7] fit 6 bits: shifting each byte left keeps its sign
            const uint32_t keep = (0xFFu << ext.shift & 0xFFu) * 0x01010101u;
#pragma unroll
            for (int h = 0; h < 4; ++h) w[h] = (w[h] << ext.shift) & keep;
          }
          reinterpret_cast<uint4*>(out + row * ld)[chunk] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
    if (kPrefetch) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
#pragma unroll
        for (int vv = 0; vv < L::kVec; ++vv) raw[j][vv] = nxt[j][vv];
    } else {
      load_row(row + act_grid, raw);
    }
  }
}

// Launches the standalone weight expansion of packed [N, K/2] into `out` ([N, K] or, with `ld_codes`, rows at
// that pitch; `x16`: codes times 16) on `stream`.
at::Tensor unpack_int4_into(const at::Tensor& packed, at::Tensor out, cudaStream_t stream, int64_t ld_codes = 0,
                            bool x16 = false, const at::Tensor* tail = nullptr) {
  const int64_t n8 = packed.numel() / 8;
  if (n8 == 0) return out;
  const int threads = 256;
  const int64_t blocks = (n8 + threads * kUnroll - 1) / (threads * kUnroll);
  WeightOut wo;
  wo.out = reinterpret_cast<uint4*>(out.data_ptr());
  wo.kpr = packed.size(1) / 8;
  wo.ld = ld_codes ? ld_codes / 16 : wo.kpr;
  wo.x16 = x16;
  if (tail != nullptr) {
    wo.tail = reinterpret_cast<const int8_t*>(tail->data_ptr());
    wo.R = (int)tail->size(1);
  }
  unpack_int4_kernel<<<(unsigned)blocks, threads, 0, stream>>>(reinterpret_cast<const uint2*>(packed.data_ptr()), wo,
                                                               n8);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The LoRA extension's arguments as the launcher sees them (ld == 0: none).
struct ExtArgs {
  int64_t ld = 0;
  const at::Tensor* h = nullptr;
  const at::Tensor* pmul = nullptr;
  at::Tensor* clamped = nullptr;
  const at::Tensor* q = nullptr;
};

template <typename T, int G, bool kPacked>
void launch_rq(const at::Tensor& x, at::Tensor& out, at::Tensor& scale, const at::Tensor* w_packed, at::Tensor* w_out,
               cudaStream_t stream, float qmax, const ExtArgs& ea = ExtArgs()) {
  const int64_t M = x.size(0);
  const int K = (int)x.size(1);
  const int chunks = K / kChunk;
  constexpr int lanes = G / kChunk;
  // Fewest chunks per thread that fit one block, keeping the group's lanes together.
  int cpt = 1;
  // Blocks of more than one chunk per thread stop at 512 threads so the registers fit without spilling.
  auto fits = [&](int c) { return chunks % c == 0 && (chunks / c) % lanes == 0 && chunks / c <= (c <= 2 ? 1024 : 512); };
  while (cpt <= 8 && !fits(cpt)) cpt *= 2;
  TORCH_CHECK(cpt <= 8, "convrot: K=", K, " too large or not divisible for the rotate-quantize kernel");
  const int active = chunks / cpt;
  const int threads = (active + 31) / 32 * 32;
  auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  auto* op = out.data_ptr<int8_t>();
  auto* sp = scale.data_ptr<float>();
  // Short rows (<= 256 threads): one row per block, many small blocks per SM overlap their phases well (v3 sweep:
  // 25.2 vs 27.9 us at K = 3072). Long rows: persistent blocks with the next row prefetched (155 vs 191 us at 15360).
  const bool short_rows = cpt == 1 && threads <= 256;
  auto kernel = short_rows ? rotate_quantize_kernel<T, G, 1, kPacked, false>
                : cpt == 1 ? rotate_quantize_kernel<T, G, 1, kPacked, true>
                : cpt == 2 ? rotate_quantize_kernel<T, G, 2, kPacked, true>
                : cpt == 4 ? rotate_quantize_kernel<T, G, 4, kPacked, true>
                           : rotate_quantize_kernel<T, G, 8, kPacked, true>;
  // As many resident blocks as fit, each looping over rows.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int64_t slots = (int64_t)std::max(per_sm, 1) * convrot::sm_count();
  int64_t grid = short_rows ? M : std::min<int64_t>(M, slots);
  // Experiment hook (bench --act-sweep): CONVROT_ACT_GRID=-1 gives one row per block (the v1 schedule), N > 0 caps it.
  if (const char* e = std::getenv("CONVROT_ACT_GRID")) {
    const long g = std::atol(e);
    if (g < 0) grid = M;
    else if (g > 0) grid = std::min<int64_t>(M, g);
  }
  int64_t wn8 = 0, wblocks = 0;
  const uint2* wp = nullptr;
  // The weight rides in the same launch only behind one-row blocks. Behind persistent blocks, which hold
  // every slot until the end, it gained nothing and once ran 134 us against 84 us for two launches
  // (4096x12288x3072, bench v7), so long rows get a second launch.
  if (w_packed != nullptr && !short_rows) {
    *w_out = unpack_int4_into(*w_packed, *w_out, stream, ea.ld, ea.ld != 0, ea.q);
    w_packed = nullptr;
  }
  WeightOut wo;
  if (w_packed != nullptr) {
    wn8 = w_packed->numel() / 8;
    wblocks = (wn8 + (int64_t)threads * kUnroll - 1) / ((int64_t)threads * kUnroll);
    wp = reinterpret_cast<const uint2*>(w_packed->data_ptr());
    wo.out = reinterpret_cast<uint4*>(w_out->data_ptr());
    wo.kpr = w_packed->size(1) / 8;
    wo.ld = ea.ld ? ea.ld / 16 : wo.kpr;
    wo.x16 = ea.ld != 0;
    if (ea.q != nullptr) {
      wo.tail = reinterpret_cast<const int8_t*>(ea.q->data_ptr());
      wo.R = (int)ea.q->size(1);
    }
  }
  ActExt<T> ext;
  if (ea.ld) {
    ext.ld = ea.ld;
    ext.shift = 2;
    ext.h = reinterpret_cast<const T*>(ea.h->data_ptr());
    ext.pmul = ea.pmul->data_ptr<float>();
    ext.R = (int)ea.h->size(1);
    ext.clamped = ea.clamped->data_ptr<int>();
  }
  kernel<<<(unsigned)(grid + wblocks), threads, 0, stream>>>(xp, op, sp, M, K, active, (int)grid, wp, wo, wn8, qmax,
                                                             ext);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kPacked>
void dispatch_g(const at::Tensor& x, at::Tensor& out, at::Tensor& scale, int64_t G, const at::Tensor* wp, at::Tensor* wo,
                cudaStream_t s, float qmax, const ExtArgs& ea) {
  if (G == 16) launch_rq<T, 16, kPacked>(x, out, scale, wp, wo, s, qmax, ea);
  else if (G == 64) launch_rq<T, 64, kPacked>(x, out, scale, wp, wo, s, qmax, ea);
  else launch_rq<T, 256, kPacked>(x, out, scale, wp, wo, s, qmax, ea);
}

template <bool kPacked>
std::tuple<at::Tensor, at::Tensor> rotate_quantize_impl(const at::Tensor& x, int64_t group_size, const at::Tensor* wp,
                                                        at::Tensor* wo, float qmax = 7.f,
                                                        const ExtArgs& ea = ExtArgs()) {
  check_rq_input(x, group_size);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto out = at::empty({M, kPacked ? K / 2 : (ea.ld ? ea.ld : K)}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (M == 0) {
    if (wp != nullptr) unpack_int4_into(*wp, *wo, stream, ea.ld, ea.ld != 0, ea.q);
    return {out, scale};
  }
  switch (x.scalar_type()) {
    case at::kBFloat16: dispatch_g<__nv_bfloat16, kPacked>(x, out, scale, group_size, wp, wo, stream, qmax, ea); break;
    case at::kHalf: dispatch_g<__half, kPacked>(x, out, scale, group_size, wp, wo, stream, qmax, ea); break;
    default: dispatch_g<float, kPacked>(x, out, scale, group_size, wp, wo, stream, qmax, ea); break;
  }
  return {out, scale};
}

}  // namespace

void check_rq_input(const at::Tensor& x, int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "convrot.rotate_quantize: expected a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "convrot.rotate_quantize: expected a 2-D [M, K] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "convrot.rotate_quantize: input must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "convrot.rotate_quantize: dtype must be bfloat16, float16 or float32, got ", x.scalar_type());
  TORCH_CHECK(group_size == 16 || group_size == 64 || group_size == 256,
              "convrot.rotate_quantize: group_size must be 16, 64 or 256, got ", group_size);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 64 == 0 && K % group_size == 0, "convrot.rotate_quantize: K=", K,
              " must be a multiple of 64 and of group_size=", group_size);
  TORCH_CHECK(K <= 65536, "convrot.rotate_quantize: K=", K, " above the kernel's limit of 65536");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "convrot.rotate_quantize: input not 16-byte aligned");
}

std::tuple<at::Tensor, at::Tensor> rotate_quantize_packed(const at::Tensor& x, int64_t group_size) {
  return rotate_quantize_impl<true>(x, group_size, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor> rotate_quantize_int8(const at::Tensor& x, int64_t group_size) {
  return rotate_quantize_impl<false>(x, group_size, nullptr, nullptr);
}

// W8A8: the same rotation with symmetric int8 codes in [-127, 127] (the fp32 multiply-round path holds them exactly).
std::tuple<at::Tensor, at::Tensor> rotate_quantize_q8(const at::Tensor& x, int64_t group_size) {
  return rotate_quantize_impl<false>(x, group_size, nullptr, nullptr, 127.f);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_quantize_int8_unpack(const at::Tensor& x, int64_t group_size,
                                                                           const at::Tensor& w_packed) {
  TORCH_CHECK(w_packed.is_cuda() && w_packed.dim() == 2 && w_packed.is_contiguous() &&
                  w_packed.scalar_type() == at::kChar && w_packed.device() == x.device(),
              "convrot.rotate_quantize_i8_unpack: weight must be a contiguous 2-D int8 tensor on x's device");
  TORCH_CHECK(w_packed.size(1) % 8 == 0, "convrot.rotate_quantize_i8_unpack: packed row length must be a multiple of 8");
  at::Tensor w_out = at::empty({w_packed.size(0), w_packed.size(1) * 2}, w_packed.options());
  auto [a, s] = rotate_quantize_impl<false>(x, group_size, &w_packed, &w_out);
  return {a, s, w_out};
}

// A W4A4 linear with LoRA branches folded into the integer GEMM: K is extended by R low-rank columns.
//   a = [4 * codes(x) | p],  w = [16 * codes(W) | q],  w_scale / 64 in the epilogue,
// so a_scale[m] * w_scale[n] / 64 * (sum_k a w) = the plain W4A4 product + sum_r p[m,r] q[n,r] a_scale[m] w_scale[n] / 64.
// With q = round(U / w_scale * c) (prepared once per LoRA, [N, R] int8) and p = round(h * pmul / a_scale) where
// h = x @ downᵀ and pmul = 64 / c, the second sum is h @ Uᵀ up to the codes' rounding (in units of 1/64 of one
// 4-bit product step). The LoRA costs R more columns of the GEMM instead of two passes over the [M, N] output.
// Accumulators stay inside int32: K * 28 * 112 + R * 127^2 < 2^31 for every K <= 65536 and R <= 256.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_quantize_int8_unpack_lora(
    const at::Tensor& x, int64_t group_size, const at::Tensor& w_packed, const at::Tensor& h, const at::Tensor& pmul,
    const at::Tensor& q, const at::Tensor& clamped) {
  const char* name = "convrot.rotate_quantize_i8_unpack_lora";
  check_rq_input(x, group_size);
  TORCH_CHECK(x.scalar_type() != at::kFloat, name, ": x must be bfloat16 or float16");
  TORCH_CHECK(w_packed.is_cuda() && w_packed.dim() == 2 && w_packed.is_contiguous() &&
                  w_packed.scalar_type() == at::kChar && w_packed.device() == x.device() &&
                  w_packed.size(1) * 2 == x.size(1),
              name, ": weight must be a contiguous packed int8 [N, K/2] tensor on x's device");
  const int64_t M = x.size(0), K = x.size(1), N = w_packed.size(0), R = h.size(1);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.is_contiguous() && h.scalar_type() == x.scalar_type() &&
                  h.device() == x.device(), name, ": h must be a contiguous [M, R] tensor of x's dtype and device");
  TORCH_CHECK(R > 0 && R % 64 == 0 && R <= 256, name, ": R=", R, " must be a positive multiple of 64, at most 256");
  TORCH_CHECK(K * 28 * 112 + R * 127 * 127 < (int64_t)1 << 31, name, ": K=", K, " too large for the extension");
  TORCH_CHECK(pmul.is_cuda() && pmul.scalar_type() == at::kFloat && pmul.numel() == R && pmul.is_contiguous() &&
                  pmul.device() == x.device(), name, ": pmul must be float32 [R] on x's device");
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kChar && q.dim() == 2 && q.size(0) == N && q.size(1) == R &&
                  q.is_contiguous() && q.device() == x.device(), name, ": q must be a contiguous int8 [N, R] tensor");
  TORCH_CHECK(clamped.is_cuda() && clamped.scalar_type() == at::kInt && clamped.numel() >= 1 &&
                  clamped.device() == x.device(), name, ": clamped must be an int32 CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor w_out = at::empty({N, K + R}, w_packed.options());
  ExtArgs ea;
  ea.ld = K + R;
  ea.h = &h;
  ea.pmul = &pmul;
  ea.clamped = const_cast<at::Tensor*>(&clamped);
  ea.q = &q;  // copied by the weight expansion (a strided cudaMemcpy2D of N x 64 bytes took ~25 us per layer)
  auto [a, s] = rotate_quantize_impl<false>(x, group_size, &w_packed, &w_out, 7.f, ea);
  return {a, s, w_out};
}

at::Tensor unpack_int4(const at::Tensor& packed) {
  TORCH_CHECK(packed.is_cuda() && packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kChar,
              "convrot.unpack_int4: expected a contiguous 2-D int8 CUDA tensor");
  TORCH_CHECK(packed.size(1) % 8 == 0, "convrot.unpack_int4: packed row length must be a multiple of 8 bytes");
  c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({packed.size(0), packed.size(1) * 2}, packed.options());
  return unpack_int4_into(packed, out, c10::cuda::getCurrentCUDAStream());
}

}  // namespace convrot
