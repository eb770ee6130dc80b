// The last step of the CUTLASS 2 segmented GEMM (gemm_sm80.cuh): the float32 sum of the scaled segment
// partials -> out[m, n] = row_scale[m] * (col_scale[n] * W[m, n]) + bias[n] in bf16 / fp16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "segquant_kernels.h"

namespace {

__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ float load_bias(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_bias(const __half* p) { return __half2float(*p); }

// One thread per 4 consecutive columns (N is a multiple of 8, so rows hold whole groups).
template <class T>
__global__ void finalize_kernel(const float4* __restrict__ W, T* __restrict__ out, int64_t groups, int N4,
                                const float* __restrict__ row_scale, const float* __restrict__ col_scale,
                                const T* __restrict__ bias) {
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = g / N4;
    const int n = (int)(g - m * N4) * 4;
    const float rs = row_scale ? row_scale[m] : 1.f;
    const float4 w = W[g];
    const float v[4] = {w.x, w.y, w.z, w.w};
    T* o = out + m * (int64_t)N4 * 4 + n;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float b = bias ? load_bias(bias + n + i) : 0.f;
      store_out(o + i, rs * (col_scale[n + i] * v[i]) + b);  // the rounding order of the fused epilogues
    }
  }
}

}  // namespace

namespace segquant {
namespace sm80 {

sq_status seg80_finalize(const float* W, void* out, sq_dtype out_dtype, int M, int N, const float* row_scale,
                         const float* col_scale, const void* bias, cudaStream_t stream) {
  if (N % 4 != 0) return SQ_ERR_UNSUPPORTED;
  const int N4 = N / 4;
  const int64_t groups = (int64_t)M * N4;
  const int threads = 256;
  const int64_t want = (groups + threads - 1) / threads;
  const int blocks = (int)(want < 65535 * 8 ? want : 65535 * 8);
  const auto* w4 = reinterpret_cast<const float4*>(W);
  if (out_dtype == SQ_BF16) {
    finalize_kernel<<<blocks, threads, 0, stream>>>(w4, static_cast<__nv_bfloat16*>(out), groups, N4, row_scale,
                                                    col_scale, static_cast<const __nv_bfloat16*>(bias));
  } else if (out_dtype == SQ_FP16) {
    finalize_kernel<<<blocks, threads, 0, stream>>>(w4, static_cast<__half*>(out), groups, N4, row_scale, col_scale,
                                                    static_cast<const __half*>(bias));
  } else {
    return SQ_ERR_UNSUPPORTED;
  }
  return sq::check_launch("sq_gemm_segmented (sm_80 path): finalize");
}

}  // namespace sm80
}  // namespace segquant
