// int8 x int8 -> int32 accumulation, scaled epilogue (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"
SQ_DEFINE_GEMM_ENTRY(int8, int8_t, LargeGemm)
