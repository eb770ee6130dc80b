// Shared helpers of the segquant_kernels library (internal; not part of the C API).
//
// * error reporting: sq::set_last_error() (thread-local text returned by sq_last_error()),
//   sq::check_launch() (cudaGetLastError -> sq_status);
// * argument checks: sq::check_segments(), sq::aligned();
// * element conversion and 16-byte vector access: sq::load_chunk(), sq::store_bytes();
// * the exact quantization arithmetic of segquant_fx/ops/README.md: sq::quant_elem().
#ifndef SEGQUANT_COMMON_CUH_
#define SEGQUANT_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "segquant_kernels.h"

namespace sq {

// ------------------------------------------------------------------------------------------------
// errors
// ------------------------------------------------------------------------------------------------

// Record the text returned by sq_last_error() for the calling thread (printf format). Defined in
// api.cu.
void set_last_error(const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

// Map the calling thread's pending CUDA error (after a launch) to a status, recording its text.
inline sq_status check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return SQ_OK;
  set_last_error("%s: %s: %s", what, cudaGetErrorName(e), cudaGetErrorString(e));
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorUnsupportedPtxVersion) return SQ_ERR_ARCH;
  return SQ_ERR_CUDA;
}

// Check a segment table against the last dim K: 1 <= n <= SQ_MAX_SEGMENTS, offsets[0] == 0,
// strictly increasing, offsets[n] == K.
inline bool check_segments(const sq_segments& s, int64_t K, const char* op) {
  if (s.n < 1 || s.n > SQ_MAX_SEGMENTS) {
    set_last_error("%s: segs.n = %d, need 1 <= n <= %d", op, (int)s.n, SQ_MAX_SEGMENTS);
    return false;
  }
  if (s.offsets[0] != 0) {
    set_last_error("%s: segs.offsets[0] = %d, need 0", op, (int)s.offsets[0]);
    return false;
  }
  for (int i = 0; i < s.n; ++i) {
    if (s.offsets[i + 1] <= s.offsets[i]) {
      set_last_error("%s: segs.offsets must increase strictly, got offsets[%d] = %d, offsets[%d] = %d", op, i,
                     (int)s.offsets[i], i + 1, (int)s.offsets[i + 1]);
      return false;
    }
  }
  if ((int64_t)s.offsets[s.n] != K) {
    set_last_error("%s: segs.offsets[n] = %d must equal K = %lld", op, (int)s.offsets[s.n], (long long)K);
    return false;
  }
  return true;
}

// Which GEMM implementation runs on the calling thread's current device (sq_set_gemm_path, api.cu).
enum class GemmPath { kNone, kSm90, kSm80 };
struct GemmTarget {
  GemmPath path = GemmPath::kNone;
  int cc = 0;  // compute capability of the current device, major * 10 + minor (0: no device)
};
GemmTarget gemm_target();

// The status for "no GEMM path for this device" (records the reason for sq_last_error()).
sq_status no_gemm_path(const char* op, GemmTarget t);

// fp8 e4m3 mma.sync needs sm_89+: SQ_OK, or SQ_ERR_UNSUPPORTED with the reason recorded.
sq_status check_fp8_cc(const char* op, GemmTarget t, sq_dtype ab);

inline bool aligned(const void* p, int64_t bytes) { return ((uintptr_t)p % (uintptr_t)bytes) == 0; }

inline int dtype_bytes(sq_dtype t) {
  switch (t) {
    case SQ_BF16:
    case SQ_FP16:
      return 2;
    case SQ_FP32:
      return 4;
    case SQ_INT8:
    case SQ_FP8E4M3:
      return 1;
    default:
      return 0;
  }
}

inline bool is_float_input(sq_dtype t) { return t == SQ_BF16 || t == SQ_FP16 || t == SQ_FP32; }
inline bool is_quant_output(sq_dtype t) { return t == SQ_INT8 || t == SQ_INT4 || t == SQ_FP8E4M3; }

// ------------------------------------------------------------------------------------------------
// quantized formats
// ------------------------------------------------------------------------------------------------

// Q (template parameter) values: the sq_dtype of the output.
template <int Q>
struct QFormat;
template <>
struct QFormat<SQ_INT8> {
  static constexpr float qmin = -128.f, qmax = 127.f;
  static constexpr bool is_float = false;
  static constexpr int per_byte = 1;
};
template <>
struct QFormat<SQ_INT4> {
  static constexpr float qmin = -8.f, qmax = 7.f;
  static constexpr bool is_float = false;
  static constexpr int per_byte = 2;
};
template <>
struct QFormat<SQ_FP8E4M3> {
  static constexpr float qmin = -448.f, qmax = 448.f;
  static constexpr bool is_float = true;
  static constexpr int per_byte = 1;
};

// One quantized element as its stored bits (int8: two's complement byte; int4: the value's low
// nibble in bits 0..3; fp8: the e4m3 byte). README arithmetic:
//   int: clamp(round_half_even(v / s), lo, hi)     (IEEE division, not v * (1/s))
//   fp8: e4m3_rne(clamp(v / s, lo, hi))             (clamp keeps NaN; SATFINITE is then a no-op)
template <int Q>
__device__ __forceinline__ uint8_t quant_elem(float v, float s, float lo, float hi) {
  float r = __fdiv_rn(v, s);
  if constexpr (QFormat<Q>::is_float) {
    r = r < lo ? lo : (r > hi ? hi : r);
    return (uint8_t)__nv_cvt_float_to_fp8(r, __NV_SATFINITE, __NV_E4M3);
  } else {
    r = fminf(fmaxf(rintf(r), lo), hi);
    const int i = __float2int_rn(r);
    if constexpr (Q == SQ_INT4) {
      return (uint8_t)(i & 0xF);
    } else {
      return (uint8_t)(int8_t)i;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// element conversion and vector access
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int BYTES>
struct VecType;
template <>
struct VecType<1> {
  using type = uint8_t;
};
template <>
struct VecType<2> {
  using type = uint16_t;
};
template <>
struct VecType<4> {
  using type = uint32_t;
};
template <>
struct VecType<8> {
  using type = uint2;
};
template <>
struct VecType<16> {
  using type = uint4;
};

// Load E consecutive elements of T starting at p (aligned to min(16, E * sizeof(T)) bytes) as
// float, with the widest accesses (16 bytes) that fit.
template <typename T, int E>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, float (&v)[E]) {
  constexpr int BYTES = E * (int)sizeof(T);
  constexpr int VB = BYTES >= 16 ? 16 : BYTES;
  constexpr int NV = BYTES / VB;
  constexpr int PER = VB / (int)sizeof(T);
  using V = typename VecType<VB>::type;
  static_assert(NV * VB == BYTES, "chunk size");
  V raw[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) raw[i] = reinterpret_cast<const V*>(p)[i];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    T t[PER];
    memcpy(t, &raw[i], VB);
#pragma unroll
    for (int e = 0; e < PER; ++e) v[i * PER + e] = to_float(t[e]);
  }
}

// Store N bytes at p (aligned to min(16, N)) with the widest accesses that fit.
template <int N>
__device__ __forceinline__ void store_bytes(uint8_t* __restrict__ p, const uint8_t (&b)[N]) {
  constexpr int VB = N >= 16 ? 16 : N;
  constexpr int NV = N / VB;
  using V = typename VecType<VB>::type;
  static_assert(NV * VB == N, "store size");
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    V raw;
    memcpy(&raw, &b[i * VB], VB);
    reinterpret_cast<V*>(p)[i] = raw;
  }
}

}  // namespace sq

#endif  // SEGQUANT_COMMON_CUH_
