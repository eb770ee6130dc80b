// The segmented GEMM's k-tile segment table and kernel entry points (shared by the CUTLASS translation
// units and the C API code in gemm_seg_api.cu).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "segquant_kernels.h"

namespace segquant {

constexpr int kSegTileK = 64;  // the segmented GEMM's tile K: segment boundaries must be multiples of it

// Passed by value in the kernel parameters.
struct SegTable {
  int32_t n = 1;                           // segments per half
  int32_t halves = 1;                      // 1, or 2 for DualScale
  int32_t k_tiles = 0;                     // k-tiles per half (K / kSegTileK)
  int32_t end_tile[SQ_MAX_SEGMENTS] = {};  // exclusive end of segment s, in k-tiles within a half
  const float* scale = nullptr;            // [halves * n] float32 segment scales
};

// The kernels of gemm_seg_sm90_{int8,fp8}.cu (templates in gemm_seg_sm90.cuh).
size_t seg_gemm_workspace_int8(sq_dtype out, int M, int N, int K, SegTable const& seg);
sq_status seg_gemm_run_int8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                            SegTable const& seg, const float* rs, const float* cs, const void* bias, void* ws,
                            size_t ws_size, cudaStream_t stream);
size_t seg_gemm_workspace_fp8(sq_dtype out, int M, int N, int K, SegTable const& seg);
sq_status seg_gemm_run_fp8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                           SegTable const& seg, const float* rs, const float* cs, const void* bias, void* ws,
                           size_t ws_size, cudaStream_t stream);

}  // namespace segquant
