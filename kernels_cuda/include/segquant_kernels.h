/*
 * segquant_kernels: CUDA/CUTLASS kernels for the segquant quantized-linear op set.
 *
 * A torch-independent C ABI. Every function takes device pointers, sizes, strides and a
 * cudaStream_t (passed as void* so this header needs no CUDA headers), launches asynchronously on
 * that stream (no host synchronisation, no allocation: safe inside CUDA graph capture) and returns
 * an sq_status. The arithmetic is the contract of segquant_fx/ops/README.md.
 */
#ifndef SEGQUANT_KERNELS_H_
#define SEGQUANT_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SQ_API_VERSION 2 /* 2: sq_set_gemm_path and the CUTLASS 2 (sm_80 / sm_89) GEMM path */
#define SQ_MAX_SEGMENTS 64

typedef enum {
  SQ_OK = 0,
  SQ_ERR_INVALID = 1,      /* bad argument (null pointer, size, alignment) */
  SQ_ERR_UNSUPPORTED = 2,  /* valid, but no kernel for this case (caller falls back) */
  SQ_ERR_CUDA = 3,         /* a CUDA call or launch failed */
  SQ_ERR_ARCH = 4          /* the device's architecture is not compiled in */
} sq_status;

typedef enum {
  SQ_INT8 = 0,
  SQ_INT4 = 1,     /* packed two per byte along the last dim, low nibble = even element */
  SQ_FP8E4M3 = 2,
  SQ_BF16 = 10,
  SQ_FP16 = 11,
  SQ_FP32 = 12
} sq_dtype;

/* Segments along the last dim K: offsets[0] = 0 < offsets[1] < ... < offsets[n] = K, n >= 1.
 * Passed by value so launches need no device-side table. */
typedef struct {
  int32_t n;
  int32_t offsets[SQ_MAX_SEGMENTS + 1];
} sq_segments;

/* A float32 scale tensor broadcast to [rows, nseg]: element (r, s) is
 * ptr[r * row_stride + s * seg_stride]; row_stride 0 = same for every row, seg_stride 0 = same
 * for every segment. */
typedef struct {
  const float* ptr;
  int64_t row_stride;
  int64_t seg_stride;
} sq_scale;

int sq_api_version(void);
const char* sq_status_string(sq_status s);
/* Last CUDA error text of the calling thread's most recent failing call (static storage). */
const char* sq_last_error(void);

/* q = clamp(round_half_even((x / smooth) / scale[r, seg(j)])) (int8/int4) or
 * e4m3(clamp((x / smooth) / scale, -448, 448)) (fp8). x: [rows, K] contiguous rows of x_dtype
 * (bf16/fp16/fp32); q: [rows, K] (int4: [rows, K/2] bytes). smooth: [K] float32 or NULL. */
sq_status sq_quantize(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, int64_t rows, int64_t K,
                      sq_scale scale, sq_segments segs, const float* smooth, void* stream);

/* Per-row, per-segment absmax scales: scale_out[r, s] = max(amax, 2^-24) / qmax (float32,
 * [rows, nseg] contiguous), then q as sq_quantize. */
sq_status sq_quantize_dynamic(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, float* scale_out,
                              int64_t rows, int64_t K, sq_segments segs, const float* smooth, void* stream);

/* DualScale: q is [rows, 2K] (int4: [rows, K] bytes): first half Q+(max(x,0)) with scale_pos,
 * second half Q-(min(x,0)) with scale_neg. */
sq_status sq_quantize_dual(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, int64_t rows, int64_t K,
                           sq_scale scale_pos, sq_scale scale_neg, sq_segments segs, const float* smooth,
                           void* stream);

/* D[m, n] = row_scale[m] * col_scale[n] * sum_k A[m, k] * B[n, k] + bias[n]
 * A: [M, K] row-major (lda = K), B: [N, K] row-major (ldb = K), D: [M, N] row-major, out_dtype
 * bf16/fp16/fp32. ab_dtype SQ_INT8 (int32 accumulation) or SQ_FP8E4M3 (fp32 accumulation).
 * row_scale: [M] float32; col_scale: [N] float32; bias: [N] of out_dtype or NULL.
 * K must be a multiple of 16, N a multiple of 8. workspace may be NULL when
 * sq_gemm_workspace_size() returns 0. */
size_t sq_gemm_workspace_size(sq_dtype ab_dtype, sq_dtype out_dtype, int64_t M, int64_t N, int64_t K);
sq_status sq_gemm(const void* A, const void* B, sq_dtype ab_dtype, void* D, sq_dtype out_dtype, int64_t M,
                  int64_t N, int64_t K, const float* row_scale, const float* col_scale, const void* bias,
                  void* workspace, size_t workspace_size, void* stream);

/* Segmented / DualScale GEMM (sm_90a; CUTLASS 2 path on sm_80+, see sq_set_gemm_path):
 * D[m, n] = row_scale[m] * col_scale[n] * sum_h sum_s seg_scale[h * segs.n + s] *
 *           sum_{k in segment s} A[m, h * K + k] * B[n, k]  + bias[n]
 * A: [M, halves * K] row-major (halves = 2: DualScale, A = [Q+ | Q-] from sq_quantize_dual; both halves
 * multiply the same B, which streams from memory once); B: [N, K] row-major; D: [M, N] row-major bf16/fp16.
 * segs: segments of K (each half); every boundary and K must be multiples of 64, N of 8 (else
 * SQ_ERR_UNSUPPORTED). seg_scale: [halves * segs.n] float32 (per segment activation scales: one per
 * segment of each half); row_scale: [M] float32 or NULL (= 1); col_scale: [N] float32; bias: [N] of
 * out_dtype or NULL. int8: exact int32 accumulation within a segment, float across segments; fp8: float,
 * promoted every segment and every 128 K. Available when the symbol exists (library built with it). */
size_t sq_gemm_segmented_workspace_size(sq_dtype ab_dtype, sq_dtype out_dtype, int64_t M, int64_t N, int64_t K,
                                        int32_t halves);
sq_status sq_gemm_segmented(const void* A, const void* B, sq_dtype ab_dtype, void* D, sq_dtype out_dtype,
                            int64_t M, int64_t N, int64_t K, int32_t halves, sq_segments segs,
                            const float* seg_scale, const float* row_scale, const float* col_scale,
                            const void* bias, void* workspace, size_t workspace_size, void* stream);

/* Which GEMM implementation sq_gemm / sq_gemm_segmented use.
 * SQ_PATH_AUTO (default): sm_90 devices run the sm_90a kernels (CUTLASS 3, wgmma); sm_80 and later
 * others run the CUTLASS 2 kernels (mma.sync: int8 on sm_80+, fp8 on sm_89+; their segmented GEMM
 * accumulates one segment at a time into a float32 workspace of M * N * 4 bytes).
 * SQ_PATH_SM80 forces the CUTLASS 2 kernels, also on sm_90 (how the tests check them on Hopper);
 * SQ_PATH_SM90 allows only the sm_90a kernels (SQ_ERR_ARCH elsewhere). Process-wide; returns the
 * previous setting (an unknown value is ignored and leaves the setting unchanged). */
typedef enum { SQ_PATH_AUTO = 0, SQ_PATH_SM90 = 1, SQ_PATH_SM80 = 2 } sq_gemm_path;
sq_gemm_path sq_set_gemm_path(sq_gemm_path path);

/* Packed int4 (two per byte along the last dim, low nibble = even element) -> int8, [rows, K] values:
 * packed is [rows, K/2] bytes, out [rows, K] int8. K must be even. The W4A8 / W4A4 GEMM path of the
 * binding unpacks its int4 operands with this and runs the int8 GEMMs (Hopper has no int4 tensor cores). */
sq_status sq_unpack_int4(const void* packed, void* out, int64_t rows, int64_t K, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* SEGQUANT_KERNELS_H_ */
