// Segmented / DualScale fp8 e4m3 x fp8 e4m3 GEMM (float promotion every segment and every 128 K); see
// gemm_seg_sm90.cuh.
#include "gemm_seg_sm90.cuh"
SQ_DEFINE_SEG_GEMM_ENTRY(fp8, cutlass::float_e4m3_t)
