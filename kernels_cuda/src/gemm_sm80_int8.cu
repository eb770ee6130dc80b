// int8 x int8 -> int32, CUTLASS 2 path (sm_80+): scaled GEMM and segmented loop (see gemm_sm80.cuh).
#include "common.cuh"
#include "gemm_sm80.cuh"
SQ_DEFINE_GEMM80_ENTRY(int8, int8_t)
