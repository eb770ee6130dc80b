// The k-tile segment table of the segmented GEMM (shared by the CUTLASS kernels and the C API code).
#pragma once

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

}  // namespace segquant
