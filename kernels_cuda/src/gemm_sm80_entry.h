// Entry points of the CUTLASS 2 GEMM path (gemm_sm80_int8.cu, gemm_sm89_fp8.cu; templates in gemm_sm80.cuh),
// called by the C API dispatch in gemm_sm90.cu and gemm_seg_api.cu.
#pragma once

#include <cuda_runtime.h>

#include "gemm_seg_table.h"
#include "segquant_kernels.h"

namespace segquant {

sq_status gemm80_run_int8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                          const float* rs, const float* cs, const void* bias, cudaStream_t stream);
sq_status gemm80_run_fp8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                         const float* rs, const float* cs, const void* bias, cudaStream_t stream);
sq_status seg_gemm80_run_int8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                              SegTable const& seg, const float* rs, const float* cs, const void* bias, void* ws,
                              size_t ws_size, cudaStream_t stream);
// Workspace of the CUTLASS 2 segmented GEMM: the float32 [M, N] sum of the scaled segment partials.
inline size_t seg_gemm80_workspace(int64_t M, int64_t N) { return size_t(M) * size_t(N) * sizeof(float); }

sq_status seg_gemm80_run_fp8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                             SegTable const& seg, const float* rs, const float* cs, const void* bias, void* ws,
                             size_t ws_size, cudaStream_t stream);

}  // namespace segquant
