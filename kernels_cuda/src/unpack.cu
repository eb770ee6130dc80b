// sq_unpack_int4: packed int4 (two per byte, low nibble = even element, 4-bit two's complement) to int8.
//
// Hopper has no int4 tensor cores, so W4A8 / W4A4 GEMMs unpack their int4 operands into int8 scratch
// and run the int8 GEMMs (sq_gemm / sq_gemm_segmented). Storage keeps the 4-bit footprint; each call
// pays one extra pass over the operand (read K/2 bytes, write K bytes per row).
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

__device__ __forceinline__ uint32_t expand4(uint32_t two_bytes) {
  // two packed bytes (4 nibbles) -> 4 sign-extended int8 values in one 32-bit word
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int32_t nib = (two_bytes >> (4 * i)) & 0xF;
    int32_t v = (nib ^ 0x8) - 0x8;  // sign-extend 4 bits
    out |= (uint32_t(v) & 0xFF) << (8 * i);
  }
  return out;
}

// Vector path: each thread turns 8 packed bytes (16 values) into one 16-byte store.
__global__ void unpack_vec(const uint2* __restrict__ src, uint4* __restrict__ dst, int64_t n_vec) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_vec; i += (int64_t)gridDim.x * blockDim.x) {
    uint2 p = src[i];
    dst[i] = make_uint4(expand4(p.x & 0xFFFF), expand4(p.x >> 16), expand4(p.y & 0xFFFF), expand4(p.y >> 16));
  }
}

// Scalar path (any size and alignment): one packed byte -> two int8 values.
__global__ void unpack_scalar(const uint8_t* __restrict__ src, int8_t* __restrict__ dst, int64_t n_bytes) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_bytes; i += (int64_t)gridDim.x * blockDim.x) {
    uint8_t b = src[i];
    dst[2 * i] = (int8_t)(((int)(b & 0xF) ^ 0x8) - 0x8);
    dst[2 * i + 1] = (int8_t)(((int)(b >> 4) ^ 0x8) - 0x8);
  }
}

int grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return (int)(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace

extern "C" sq_status sq_unpack_int4(const void* packed, void* out, int64_t rows, int64_t K, void* stream) {
  const char* op = "sq_unpack_int4";
  if (rows < 0 || K <= 0 || K % 2 != 0) {
    sq::set_last_error("%s: need rows >= 0 and an even K > 0 (got rows=%lld K=%lld)", op, (long long)rows,
                       (long long)K);
    return SQ_ERR_INVALID;
  }
  if (rows == 0) return SQ_OK;
  if (!packed || !out) {
    sq::set_last_error("%s: packed and out must not be NULL", op);
    return SQ_ERR_INVALID;
  }
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n_bytes = rows * (K / 2);
  constexpr int kThreads = 256;
  if (n_bytes % 8 == 0 && sq::aligned(packed, 8) && sq::aligned(out, 16)) {
    const int64_t n_vec = n_bytes / 8;
    unpack_vec<<<grid_for(n_vec, kThreads), kThreads, 0, s>>>(static_cast<const uint2*>(packed),
                                                             static_cast<uint4*>(out), n_vec);
  } else {
    unpack_scalar<<<grid_for(n_bytes, kThreads), kThreads, 0, s>>>(static_cast<const uint8_t*>(packed),
                                                                   static_cast<int8_t*>(out), n_bytes);
  }
  return sq::check_launch(op);
}
