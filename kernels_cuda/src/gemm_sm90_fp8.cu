// fp8 e4m3 x fp8 e4m3 -> fp32 accumulation, scaled epilogue (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"
SQ_DEFINE_GEMM_ENTRY(fp8, cutlass::float_e4m3_t, LargeGemmFp8)
