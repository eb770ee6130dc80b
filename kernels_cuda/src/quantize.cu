// sq_quantize, sq_quantize_dynamic, sq_quantize_dual: row-wise quantization kernels.
//
// One row of x per group of TPR threads (a multiple of 32, at most 256), up to 8 rows per block for
// short rows. Each thread handles chunks of E consecutive elements: E * sizeof(T) input bytes read
// with 16-byte loads where they fit and E (int8/fp8) or E/2 (int4) output bytes written with one
// store (16 bytes for E = 16, or E = 32 for int4). E is the largest of 16, 4, 1 (int4: 32, 8, 2)
// that divides K and matches the pointers' alignment, so an odd K runs the scalar (E = 1) kernel.
//
// The segment offsets and the row's per-segment scales live in shared memory; an element's segment
// comes from a binary search for the chunk's first element, then a forward walk (segments may
// change inside a chunk, also inside an int4 byte).
//
// Dynamic: a first pass reduces |x / smooth| per (row, segment) (integer max of the float bits,
// which orders non-negative floats and keeps NaN), the row's scales are written, and a second pass
// (x re-read, from L1/L2) quantizes as the static kernel does.
//
// Arithmetic (segquant_fx/ops/README.md): float32; v = float(x) / smooth (IEEE division), then
// v / scale (IEEE division, not a reciprocal multiply), round half to even, clamp; fp8: clamp to
// [-448, 448] then e4m3 round-to-nearest-even.
#include <limits.h>

#include "common.cuh"

namespace sq {
namespace {

constexpr int kBlock = 256;
constexpr int kMaxRowsPerBlock = 8;
constexpr float kAmaxFloor = 5.9604644775390625e-08f;  // 2^-24

enum Mode { kStatic = 0, kDynamic = 1, kDual = 2 };

struct Params {
  const void* x;
  uint8_t* q;
  float* scale_out;  // dynamic only: [rows, n]
  int64_t rows;
  int K;
  sq_scale sa;  // static scale, or scale_pos (dual)
  sq_scale sb;  // scale_neg (dual)
  const float* smooth;
};

// Largest segment index s with off[s] <= j (off[0] = 0 <= j < off[n]).
__device__ __forceinline__ int find_segment(const int* off, int n, int j) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= j)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Segment of each element j0 .. j0 + E - 1.
template <int E>
__device__ __forceinline__ void chunk_segments(const int* off, int n, int j0, int (&sg)[E]) {
  if (n == 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) sg[e] = 0;
    return;
  }
  int s = find_segment(off, n, j0);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    while (j0 + e >= off[s + 1]) ++s;
    sg[e] = s;
  }
}

// Load E elements of row xr at j0 as float32, divided by smooth when given.
template <typename T, int E>
__device__ __forceinline__ void load_values(const T* __restrict__ xr, const float* __restrict__ smooth, int j0,
                                            float (&v)[E]) {
  load_chunk<T, E>(xr + j0, v);
  if (smooth != nullptr) {
    float sm[E];
    load_chunk<float, E>(smooth + j0, sm);
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = __fdiv_rn(v[e], sm[e]);
  }
}

// Quantize E values (each with its own scale) into the E / per_byte stored bytes.
template <int Q, int E>
__device__ __forceinline__ void quant_pack(const float (&v)[E], const float (&sc)[E], float lo, float hi,
                                           uint8_t (&b)[E / QFormat<Q>::per_byte]) {
  if constexpr (Q == SQ_INT4) {
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const uint8_t l = quant_elem<Q>(v[2 * i], sc[2 * i], lo, hi);
      const uint8_t h = quant_elem<Q>(v[2 * i + 1], sc[2 * i + 1], lo, hi);
      b[i] = (uint8_t)(l | (h << 4));
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) b[e] = quant_elem<Q>(v[e], sc[e], lo, hi);
  }
}

template <typename T, int Q, int E, int MODE>
__global__ void __launch_bounds__(kBlock)
    quantize_rows_kernel(const Params p, const __grid_constant__ sq_segments segs) {
  using F = QFormat<Q>;
  constexpr int PB = F::per_byte;
  constexpr int RD = MODE == kDual ? kMaxRowsPerBlock : 1;
  constexpr int SD = MODE == kDual ? SQ_MAX_SEGMENTS : 1;
  constexpr int RA = MODE == kDynamic ? kMaxRowsPerBlock : 1;
  constexpr int SA = MODE == kDynamic ? SQ_MAX_SEGMENTS : 1;
  __shared__ int s_off[SQ_MAX_SEGMENTS + 1];
  __shared__ float s_sa[kMaxRowsPerBlock][SQ_MAX_SEGMENTS];
  __shared__ float s_sb[RD][SD];
  __shared__ unsigned s_amax[RA][SA];

  const int n = segs.n;
  const int K = p.K;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tpr = blockDim.x;
  const int tid = ty * tpr + tx;
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + ty;
  const bool active = row < p.rows;

  for (int i = tid; i <= n; i += tpr * blockDim.y) s_off[i] = segs.offsets[i];
  if constexpr (MODE == kDynamic) {
    for (int s = tx; s < n; s += tpr) s_amax[ty][s] = 0u;
  } else {
    if (active) {
      for (int s = tx; s < n; s += tpr) {
        s_sa[ty][s] = p.sa.ptr[row * p.sa.row_stride + s * p.sa.seg_stride];
        if constexpr (MODE == kDual) s_sb[ty][s] = p.sb.ptr[row * p.sb.row_stride + s * p.sb.seg_stride];
      }
    }
  }
  __syncthreads();

  const T* __restrict__ xr = static_cast<const T*>(p.x) + row * K;
  const int nchunks = K / E;

  if constexpr (MODE == kDynamic) {
    if (active) {
      if (n == 1) {
        unsigned m = 0u;
        for (int c = tx; c < nchunks; c += tpr) {
          float v[E];
          load_values<T, E>(xr, p.smooth, c * E, v);
#pragma unroll
          for (int e = 0; e < E; ++e) m = max(m, __float_as_uint(fabsf(v[e])));
        }
        // TPR is a multiple of 32, so a warp lies inside one row.
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
        if ((tx & 31) == 0) atomicMax(&s_amax[ty][0], m);
      } else {
        int cur = -1;
        unsigned m = 0u;
        for (int c = tx; c < nchunks; c += tpr) {
          const int j0 = c * E;
          float v[E];
          int sg[E];
          load_values<T, E>(xr, p.smooth, j0, v);
          chunk_segments<E>(s_off, n, j0, sg);
#pragma unroll
          for (int e = 0; e < E; ++e) {
            if (sg[e] != cur) {
              if (cur >= 0) atomicMax(&s_amax[ty][cur], m);
              cur = sg[e];
              m = 0u;
            }
            m = max(m, __float_as_uint(fabsf(v[e])));
          }
        }
        if (cur >= 0) atomicMax(&s_amax[ty][cur], m);
      }
    }
    __syncthreads();
    if (active) {
      for (int s = tx; s < n; s += tpr) {
        const float a = __uint_as_float(s_amax[ty][s]);
        const float c = (a != a) ? a : fmaxf(a, kAmaxFloor);  // torch.clamp(amax, min=2^-24) keeps NaN
        const float sc = __fdiv_rn(c, F::qmax);
        s_sa[ty][s] = sc;
        p.scale_out[row * n + s] = sc;
      }
    }
    __syncthreads();
  }
  if (!active) return;

  constexpr int OB = E / PB;  // stored bytes per chunk (per half for dual)
  const int64_t row_bytes = (int64_t)(MODE == kDual ? 2 : 1) * (K / PB);
  uint8_t* __restrict__ qr = p.q + row * row_bytes;
  for (int c = tx; c < nchunks; c += tpr) {
    const int j0 = c * E;
    float v[E];
    int sg[E];
    load_values<T, E>(xr, p.smooth, j0, v);
    chunk_segments<E>(s_off, n, j0, sg);
    float sc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) sc[e] = s_sa[ty][sg[e]];
    uint8_t b[OB];
    if constexpr (MODE != kDual) {
      quant_pack<Q, E>(v, sc, F::qmin, F::qmax, b);
      store_bytes<OB>(qr + j0 / PB, b);
    } else {
      float h[E];
#pragma unroll
      for (int e = 0; e < E; ++e) h[e] = v[e] < 0.f ? 0.f : v[e];  // max(v, 0), NaN kept
      quant_pack<Q, E>(h, sc, 0.f, F::qmax, b);
      store_bytes<OB>(qr + j0 / PB, b);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        h[e] = v[e] > 0.f ? 0.f : v[e];  // min(v, 0), NaN kept
        sc[e] = s_sb[ty][sg[e]];
      }
      quant_pack<Q, E>(h, sc, F::qmin, 0.f, b);
      store_bytes<OB>(qr + K / PB + j0 / PB, b);
    }
  }
}

template <typename T, int Q, int E>
bool chunk_fits(const Params& p) {
  constexpr int PB = QFormat<Q>::per_byte;
  if (E % PB != 0 || p.K % E != 0) return false;
  const int xb = E * (int)sizeof(T) < 16 ? E * (int)sizeof(T) : 16;
  const int qb = E / PB < 16 ? E / PB : 16;
  const int sb = E * 4 < 16 ? E * 4 : 16;
  return aligned(p.x, xb) && aligned(p.q, qb) && (p.smooth == nullptr || aligned(p.smooth, sb));
}

template <typename T, int Q, int E, int MODE>
sq_status launch(const Params& p, const sq_segments& segs, cudaStream_t stream, const char* op) {
  const int nchunks = p.K / E;
  int tpr = ((nchunks + 31) / 32) * 32;
  if (tpr > kBlock) tpr = kBlock;
  int rpb = kBlock / tpr;
  if (rpb > kMaxRowsPerBlock) rpb = kMaxRowsPerBlock;
  if (rpb < 1) rpb = 1;
  const int64_t blocks = (p.rows + rpb - 1) / rpb;
  if (blocks > (int64_t)INT_MAX) {
    set_last_error("%s: rows = %lld is too large for one launch", op, (long long)p.rows);
    return SQ_ERR_UNSUPPORTED;
  }
  quantize_rows_kernel<T, Q, E, MODE><<<(unsigned)blocks, dim3(tpr, rpb), 0, stream>>>(p, segs);
  return check_launch(op);
}

// Pick the widest chunk that fits K and the pointers' alignment: 16-byte stores when K allows,
// 4-byte stores otherwise, single elements (int4: single bytes) as the last resort.
template <typename T, int Q, int MODE>
sq_status dispatch_chunk(const Params& p, const sq_segments& segs, cudaStream_t stream, const char* op) {
  if constexpr (Q == SQ_INT4) {
    if (chunk_fits<T, Q, 32>(p)) return launch<T, Q, 32, MODE>(p, segs, stream, op);
    if (chunk_fits<T, Q, 8>(p)) return launch<T, Q, 8, MODE>(p, segs, stream, op);
    if (chunk_fits<T, Q, 2>(p)) return launch<T, Q, 2, MODE>(p, segs, stream, op);
  } else {
    if (chunk_fits<T, Q, 16>(p)) return launch<T, Q, 16, MODE>(p, segs, stream, op);
    if (chunk_fits<T, Q, 4>(p)) return launch<T, Q, 4, MODE>(p, segs, stream, op);
    if (chunk_fits<T, Q, 1>(p)) return launch<T, Q, 1, MODE>(p, segs, stream, op);
  }
  set_last_error("%s: x, q or smooth is not aligned to its element size (x %p, q %p, smooth %p)", op, p.x,
                 (void*)p.q, (const void*)p.smooth);
  return SQ_ERR_UNSUPPORTED;
}

template <typename T, int MODE>
sq_status dispatch_q(sq_dtype q_dtype, const Params& p, const sq_segments& segs, cudaStream_t stream,
                     const char* op) {
  switch (q_dtype) {
    case SQ_INT8:
      return dispatch_chunk<T, SQ_INT8, MODE>(p, segs, stream, op);
    case SQ_INT4:
      return dispatch_chunk<T, SQ_INT4, MODE>(p, segs, stream, op);
    case SQ_FP8E4M3:
      return dispatch_chunk<T, SQ_FP8E4M3, MODE>(p, segs, stream, op);
    default:
      break;
  }
  set_last_error("%s: q_dtype %d is not SQ_INT8, SQ_INT4 or SQ_FP8E4M3", op, (int)q_dtype);
  return SQ_ERR_INVALID;
}

template <int MODE>
sq_status run(sq_dtype x_dtype, sq_dtype q_dtype, const Params& p, const sq_segments& segs, void* stream,
              const char* op) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case SQ_BF16:
      return dispatch_q<__nv_bfloat16, MODE>(q_dtype, p, segs, st, op);
    case SQ_FP16:
      return dispatch_q<__half, MODE>(q_dtype, p, segs, st, op);
    case SQ_FP32:
      return dispatch_q<float, MODE>(q_dtype, p, segs, st, op);
    default:
      break;
  }
  set_last_error("%s: x_dtype %d is not SQ_BF16, SQ_FP16 or SQ_FP32", op, (int)x_dtype);
  return SQ_ERR_INVALID;
}

// Checks shared by the three entry points. Pointers are only required when rows > 0.
sq_status check_common(const void* x, sq_dtype x_dtype, const void* q, sq_dtype q_dtype, int64_t rows, int64_t K,
                       const sq_segments& segs, const char* op) {
  if (!is_float_input(x_dtype)) {
    set_last_error("%s: x_dtype %d is not SQ_BF16, SQ_FP16 or SQ_FP32", op, (int)x_dtype);
    return SQ_ERR_INVALID;
  }
  if (!is_quant_output(q_dtype)) {
    set_last_error("%s: q_dtype %d is not SQ_INT8, SQ_INT4 or SQ_FP8E4M3", op, (int)q_dtype);
    return SQ_ERR_INVALID;
  }
  if (rows < 0 || K < 1 || K > (int64_t)INT_MAX) {
    set_last_error("%s: need rows >= 0 and 1 <= K <= INT_MAX, got rows = %lld, K = %lld", op, (long long)rows,
                   (long long)K);
    return SQ_ERR_INVALID;
  }
  if (q_dtype == SQ_INT4 && K % 2 != 0) {
    set_last_error("%s: int4 packs two values per byte, so K must be even, got K = %lld", op, (long long)K);
    return SQ_ERR_INVALID;
  }
  if (!check_segments(segs, K, op)) return SQ_ERR_INVALID;
  if (rows > 0 && (x == nullptr || q == nullptr)) {
    set_last_error("%s: x and q must not be NULL (x %p, q %p)", op, x, q);
    return SQ_ERR_INVALID;
  }
  return SQ_OK;
}

Params make_params(const void* x, void* q, int64_t rows, int64_t K, const float* smooth) {
  Params p{};
  p.x = x;
  p.q = static_cast<uint8_t*>(q);
  p.scale_out = nullptr;
  p.rows = rows;
  p.K = (int)K;
  p.sa = sq_scale{nullptr, 0, 0};
  p.sb = sq_scale{nullptr, 0, 0};
  p.smooth = smooth;
  return p;
}

}  // namespace
}  // namespace sq

extern "C" {

sq_status sq_quantize(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, int64_t rows, int64_t K,
                      sq_scale scale, sq_segments segs, const float* smooth, void* stream) {
  const char* op = "sq_quantize";
  sq_status st = sq::check_common(x, x_dtype, q, q_dtype, rows, K, segs, op);
  if (st != SQ_OK) return st;
  if (rows == 0) return SQ_OK;
  if (scale.ptr == nullptr) {
    sq::set_last_error("%s: scale.ptr must not be NULL", op);
    return SQ_ERR_INVALID;
  }
  sq::Params p = sq::make_params(x, q, rows, K, smooth);
  p.sa = scale;
  return sq::run<sq::kStatic>(x_dtype, q_dtype, p, segs, stream, op);
}

sq_status sq_quantize_dynamic(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, float* scale_out,
                              int64_t rows, int64_t K, sq_segments segs, const float* smooth, void* stream) {
  const char* op = "sq_quantize_dynamic";
  sq_status st = sq::check_common(x, x_dtype, q, q_dtype, rows, K, segs, op);
  if (st != SQ_OK) return st;
  if (rows == 0) return SQ_OK;
  if (scale_out == nullptr) {
    sq::set_last_error("%s: scale_out must not be NULL", op);
    return SQ_ERR_INVALID;
  }
  sq::Params p = sq::make_params(x, q, rows, K, smooth);
  p.scale_out = scale_out;
  return sq::run<sq::kDynamic>(x_dtype, q_dtype, p, segs, stream, op);
}

sq_status sq_quantize_dual(const void* x, sq_dtype x_dtype, void* q, sq_dtype q_dtype, int64_t rows, int64_t K,
                           sq_scale scale_pos, sq_scale scale_neg, sq_segments segs, const float* smooth,
                           void* stream) {
  const char* op = "sq_quantize_dual";
  sq_status st = sq::check_common(x, x_dtype, q, q_dtype, rows, K, segs, op);
  if (st != SQ_OK) return st;
  if (rows == 0) return SQ_OK;
  if (scale_pos.ptr == nullptr || scale_neg.ptr == nullptr) {
    sq::set_last_error("%s: scale_pos.ptr and scale_neg.ptr must not be NULL", op);
    return SQ_ERR_INVALID;
  }
  sq::Params p = sq::make_params(x, q, rows, K, smooth);
  p.sa = scale_pos;
  p.sb = scale_neg;
  return sq::run<sq::kDual>(x_dtype, q_dtype, p, segs, stream, op);
}

}  // extern "C"
