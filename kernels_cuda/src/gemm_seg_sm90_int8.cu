// Segmented / DualScale int8 x int8 GEMM (int32 segment accumulation, float promotion); see gemm_seg_sm90.cuh.
#include "gemm_seg_sm90.cuh"
SQ_DEFINE_SEG_GEMM_ENTRY(int8, int8_t)
