// sm_90 GEMM instantiation: output f16, tile config StreamK (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

CONVROT_SM90_ENTRY_X(gemm_i8_sm90_f16_sk, cutlass::half_t, StreamK)
