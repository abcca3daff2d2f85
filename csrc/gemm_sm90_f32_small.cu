// sm_90 GEMM instantiation: output f32, tile config Small (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

CONVROT_SM90_ENTRY_X(gemm_i8_sm90_f32_small, float, Small)
