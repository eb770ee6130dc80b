// sq_gemm_segmented / sq_gemm_segmented_workspace_size: argument checks, the k-tile segment table,
// and dispatch by sq::gemm_target() to the sm_90a CUTLASS kernels of gemm_seg_sm90_*.cu or the CUTLASS 2
// per-segment loop of gemm_sm80.cuh. No path for the device: SQ_ERR_ARCH.
#include <cuda_runtime.h>

#include "common.cuh"
#include "gemm_seg_table.h"
#include "gemm_sm80_entry.h"
#include "segquant_kernels.h"

namespace {

// Validate and convert the element-offset segment table into k-tile ends.
sq_status make_table(sq_dtype ab, sq_dtype out, int64_t M, int64_t N, int64_t K, int32_t halves,
                     const sq_segments& segs, const float* seg_scale, segquant::SegTable& t) {
  const char* op = "sq_gemm_segmented";
  if (ab != SQ_INT8 && ab != SQ_FP8E4M3) return SQ_ERR_UNSUPPORTED;
  if (out != SQ_BF16 && out != SQ_FP16) return SQ_ERR_UNSUPPORTED;
  if (M <= 0 || N <= 0 || K <= 0 || (halves != 1 && halves != 2)) {
    sq::set_last_error("%s: need M, N, K > 0 and halves 1 or 2 (got M=%lld N=%lld K=%lld halves=%d)", op,
                       (long long)M, (long long)N, (long long)K, (int)halves);
    return SQ_ERR_INVALID;
  }
  if (!sq::check_segments(segs, K, op)) return SQ_ERR_INVALID;
  if (M > INT32_MAX || N > INT32_MAX || K * halves > INT32_MAX) return SQ_ERR_UNSUPPORTED;
  if (K % segquant::kSegTileK != 0 || N % 8 != 0) return SQ_ERR_UNSUPPORTED;
  t.n = segs.n;
  t.halves = halves;
  t.k_tiles = (int32_t)(K / segquant::kSegTileK);
  for (int s = 0; s < segs.n; ++s) {
    if (segs.offsets[s + 1] % segquant::kSegTileK != 0) {
      sq::set_last_error("%s: segment boundary %d is not a multiple of %d", op, (int)segs.offsets[s + 1],
                         segquant::kSegTileK);
      return SQ_ERR_UNSUPPORTED;
    }
    t.end_tile[s] = segs.offsets[s + 1] / segquant::kSegTileK;
  }
  t.scale = seg_scale;
  return SQ_OK;
}

}  // namespace

extern "C" size_t sq_gemm_segmented_workspace_size(sq_dtype ab_dtype, sq_dtype out_dtype, int64_t M, int64_t N,
                                                   int64_t K, int32_t halves) {
  segquant::SegTable t;
  sq_segments one{};
  one.n = 1;
  one.offsets[1] = (int32_t)K;
  if (make_table(ab_dtype, out_dtype, M, N, K, halves, one, nullptr, t) != SQ_OK) return 0;
  if (sq::gemm_target().path == sq::GemmPath::kSm80) {
    return segquant::seg_gemm80_workspace(M, N);
  }
  return ab_dtype == SQ_INT8 ? segquant::seg_gemm_workspace_int8(out_dtype, (int)M, (int)N, (int)K, t)
                             : segquant::seg_gemm_workspace_fp8(out_dtype, (int)M, (int)N, (int)K, t);
}

extern "C" sq_status sq_gemm_segmented(const void* A, const void* B, sq_dtype ab_dtype, void* D, sq_dtype out_dtype,
                                       int64_t M, int64_t N, int64_t K, int32_t halves, sq_segments segs,
                                       const float* seg_scale, const float* row_scale, const float* col_scale,
                                       const void* bias, void* workspace, size_t workspace_size, void* stream) {
  segquant::SegTable t;
  sq_status st = make_table(ab_dtype, out_dtype, M, N, K, halves, segs, seg_scale, t);
  if (st != SQ_OK) return st;
  if (!A || !B || !D || !seg_scale || !col_scale) {
    sq::set_last_error("sq_gemm_segmented: A, B, D, seg_scale and col_scale must not be NULL");
    return SQ_ERR_INVALID;
  }
  const sq::GemmTarget target = sq::gemm_target();
  auto s = static_cast<cudaStream_t>(stream);
  const int m = (int)M, n = (int)N, k = (int)K;
  switch (target.path) {
    case sq::GemmPath::kSm90:
      return ab_dtype == SQ_INT8 ? segquant::seg_gemm_run_int8(A, B, D, out_dtype, m, n, k, t, row_scale, col_scale,
                                                               bias, workspace, workspace_size, s)
                                 : segquant::seg_gemm_run_fp8(A, B, D, out_dtype, m, n, k, t, row_scale, col_scale,
                                                              bias, workspace, workspace_size, s);
    case sq::GemmPath::kSm80:
      if ((st = sq::check_fp8_cc("sq_gemm_segmented", target, ab_dtype)) != SQ_OK) return st;
      return ab_dtype == SQ_INT8 ? segquant::seg_gemm80_run_int8(A, B, D, out_dtype, m, n, k, t, row_scale,
                                                                 col_scale, bias, workspace, workspace_size, s)
                                 : segquant::seg_gemm80_run_fp8(A, B, D, out_dtype, m, n, k, t, row_scale,
                                                                col_scale, bias, workspace, workspace_size, s);
    default:
      return sq::no_gemm_path("sq_gemm_segmented", target);
  }
}
