// fp8 e4m3 x e4m3 -> float, CUTLASS 2 path (mma.sync e4m3 needs sm_89+; the API checks the device).
#include "common.cuh"
#include "gemm_sm80.cuh"
SQ_DEFINE_GEMM80_ENTRY(fp8, cutlass::float_e4m3_t)
