// sq_gemm / sq_gemm_workspace_size: argument checks and dispatch to the sm_90a CUTLASS 3 kernels
// (gemm_sm90_*.cu) or the CUTLASS 2 kernels (gemm_sm80_int8.cu, gemm_sm89_fp8.cu) by sq::gemm_target().
// Without a path for the device the entry points return SQ_ERR_ARCH (the caller falls back).
#include <cuda_runtime.h>

#include "common.cuh"
#include "gemm_sm80_entry.h"
#include "segquant_kernels.h"

namespace segquant {
size_t gemm_workspace_int8(sq_dtype out, int M, int N, int K);
sq_status gemm_run_int8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                        const float* rs, const float* cs, const void* bias, void* ws, size_t ws_size,
                        cudaStream_t stream);
size_t gemm_workspace_fp8(sq_dtype out, int M, int N, int K);
sq_status gemm_run_fp8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                       const float* rs, const float* cs, const void* bias, void* ws, size_t ws_size,
                       cudaStream_t stream);
}  // namespace segquant

namespace {

sq_status check(sq_dtype ab, sq_dtype out, int64_t M, int64_t N, int64_t K) {
  if (ab != SQ_INT8 && ab != SQ_FP8E4M3) return SQ_ERR_UNSUPPORTED;
  if (out != SQ_BF16 && out != SQ_FP16) return SQ_ERR_UNSUPPORTED;
  if (M <= 0 || N <= 0 || K <= 0) return SQ_ERR_INVALID;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return SQ_ERR_UNSUPPORTED;
  if (K % 16 != 0 || N % 8 != 0) return SQ_ERR_UNSUPPORTED;
  return SQ_OK;
}

}  // namespace

extern "C" size_t sq_gemm_workspace_size(sq_dtype ab_dtype, sq_dtype out_dtype, int64_t M, int64_t N, int64_t K) {
  if (check(ab_dtype, out_dtype, M, N, K) != SQ_OK) return 0;
  if (sq::gemm_target().path != sq::GemmPath::kSm90) return 0;  // the CUTLASS 2 kernels need none
  return ab_dtype == SQ_INT8 ? segquant::gemm_workspace_int8(out_dtype, (int)M, (int)N, (int)K)
                             : segquant::gemm_workspace_fp8(out_dtype, (int)M, (int)N, (int)K);
}

extern "C" sq_status sq_gemm(const void* A, const void* B, sq_dtype ab_dtype, void* D, sq_dtype out_dtype,
                             int64_t M, int64_t N, int64_t K, const float* row_scale, const float* col_scale,
                             const void* bias, void* workspace, size_t workspace_size, void* stream) {
  sq_status st = check(ab_dtype, out_dtype, M, N, K);
  if (st != SQ_OK) return st;
  if (!A || !B || !D || !row_scale || !col_scale) return SQ_ERR_INVALID;
  const sq::GemmTarget t = sq::gemm_target();
  auto s = static_cast<cudaStream_t>(stream);
  const int m = (int)M, n = (int)N, k = (int)K;
  switch (t.path) {
    case sq::GemmPath::kSm90:
      return ab_dtype == SQ_INT8
                 ? segquant::gemm_run_int8(A, B, D, out_dtype, m, n, k, row_scale, col_scale, bias, workspace,
                                           workspace_size, s)
                 : segquant::gemm_run_fp8(A, B, D, out_dtype, m, n, k, row_scale, col_scale, bias, workspace,
                                          workspace_size, s);
    case sq::GemmPath::kSm80:
      if ((st = sq::check_fp8_cc("sq_gemm", t, ab_dtype)) != SQ_OK) return st;
      return ab_dtype == SQ_INT8
                 ? segquant::gemm80_run_int8(A, B, D, out_dtype, m, n, k, row_scale, col_scale, bias, s)
                 : segquant::gemm80_run_fp8(A, B, D, out_dtype, m, n, k, row_scale, col_scale, bias, s);
    default:
      return sq::no_gemm_path("sq_gemm", t);
  }
}
