// Experimental sm_90 GEMM tile configuration X3, bf16 output only (timed by the bench; see bench/NOTES.md).
#include "gemm_sm90.cuh"

CONVROT_SM90_ENTRY_X(gemm_i8_sm90_x3, cutlass::bfloat16_t, X3)
