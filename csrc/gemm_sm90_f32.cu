// sm_90 GEMM instantiation for one output type (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

CONVROT_SM90_ENTRY(gemm_i8_sm90_f32, float)
