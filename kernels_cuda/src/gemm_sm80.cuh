// Scaled int8 / fp8 GEMMs on the CUTLASS 2 path: cp.async multistage mainloop + mma.sync, with an Sm80
// epilogue visitor tree. int8 needs sm_80+ (A100, A10/RTX 30xx, L40, RTX 40xx), fp8 e4m3 sm_89+ (L40,
// RTX 40xx). The same kernels also run on sm_90 (sq_set_gemm_path(SQ_PATH_SM80) forces them there, which
// is how tests/gpu checks them on the H100).
//
//  * ScaledGemm80:  D = row_scale[m] * (col_scale[n] * acc) + bias[n]   (bf16 / fp16 out)
//  * AccumGemm80:   W = seg_scale * acc + W                              (float32 W, read and written)
//    The segmented / DualScale GEMM runs one AccumGemm80 per (half, segment) into a float32 workspace,
//    then seg80_finalize() applies row/col scales and bias: correct on every sm_8x part, but it re-reads
//    the workspace once per segment (the sm_90a kernel promotes per segment inside its mainloop instead).
#pragma once

#include <cuda_runtime.h>

// clang-format off: visitors.hpp needs the GEMM and numeric-conversion headers included before it.
#include "cutlass/cutlass.h"
#include "cutlass/float8.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
// clang-format on

#include "common.cuh"
#include "gemm_seg_table.h"
#include "gemm_sm80_entry.h"
#include "segquant_kernels.h"

namespace segquant {
namespace sm80 {

using namespace cute;
namespace evt = cutlass::epilogue::threadblock;
using cutlass::gemm::GemmShape;

// Per element type: accumulator, math operator and the architecture tag the mma.sync needs.
template <class ElementAB>
struct MmaTraits;
template <>
struct MmaTraits<int8_t> {
  using Acc = int32_t;
  using Op = cutlass::arch::OpMultiplyAddSaturate;  // exact int32 accumulation (saturates only past 2^31)
  using Arch = cutlass::arch::Sm80;
};
template <>
struct MmaTraits<cutlass::float_e4m3_t> {
  using Acc = float;
  using Op = cutlass::arch::OpMultiplyAdd;
  using Arch = cutlass::arch::Sm89;
};

// Tile configurations (threadblock, warp, stages) from CUTLASS's own tested sm_80 16x8x32 TN list; the
// warp K equals the threadblock K (no slice-K: the Sm80 visitor epilogue expects one K partition).
struct TileLarge {  // M > 64: 128x128x64, 4 warps of 64x64, 5 stages (80 KiB shared memory)
  using TB = GemmShape<128, 128, 64>;
  using Warp = GemmShape<64, 64, 64>;
  static constexpr int kStages = 5;
};
struct TileSmall {  // M <= 64: 64x64x128, 4 warps of 32x32, 5 stages: twice the CTAs streaming the weight
  using TB = GemmShape<64, 64, 128>;
  using Warp = GemmShape<32, 32, 128>;
  static constexpr int kStages = 5;
};
constexpr int kSmallM = 64;

template <class ElementAB, class ElementOut, class Tile, class FusionCallbacks, int kAlignOut>
using KernelFor = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
    ElementAB, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, 16,     // A [M, K]
    ElementAB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16,  // B [N, K] = K x N col-major
    ElementOut, cutlass::layout::RowMajor, kAlignOut,                               // output [M, N]
    typename MmaTraits<ElementAB>::Acc, float, cutlass::arch::OpClassTensorOp, typename MmaTraits<ElementAB>::Arch,
    typename Tile::TB, typename Tile::Warp, GemmShape<16, 8, 32>, FusionCallbacks,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages, typename MmaTraits<ElementAB>::Op,
    1>::GemmKernel;

// The visitors' thread map must be the default epilogue's (same element type and access width).
template <class Tile, class ElementOut, int kAlignOut>
using ThreadMapFor = evt::OutputTileThreadLayout<typename Tile::TB, typename Tile::Warp, ElementOut, kAlignOut, 1>;

using StrideOut = Stride<int64_t, _1, int64_t>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

template <class Gemm>
sq_status launch(typename Gemm::Arguments const& args, cudaStream_t stream, const char* what) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    sq::set_last_error("%s: CUTLASS can_implement() rejected the problem", what);
    return SQ_ERR_UNSUPPORTED;
  }
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    sq_status st = sq::check_launch(what);
    return st == SQ_OK ? SQ_ERR_CUDA : st;
  }
  cutlass::Status run = gemm.run(stream);
  sq_status st = sq::check_launch(what);  // no kernel image for this device -> SQ_ERR_ARCH
  if (st != SQ_OK) return st;
  return run == cutlass::Status::kSuccess ? SQ_OK : SQ_ERR_CUDA;
}

// D = row_scale[m] * (col_scale[n] * acc) + bias[n], written as ElementD.
template <class ElementAB, class ElementD, class Tile>
struct ScaledGemm80 {
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using ThreadMap = ThreadMapFor<Tile, ElementD, kAlignD>;
  using Acc = evt::VisitorAccFetch;
  using ColScale = evt::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, _0>>;  // one value per n
  using RowScale = evt::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, _0>>;  // one value per m
  using Bias = evt::VisitorRowBroadcast<ThreadMap, ElementD, Stride<_0, _1, _0>>;
  using ScaleAcc = evt::Sm80EVT<evt::VisitorCompute<cutlass::multiplies, float, float, kRound>, ColScale, Acc>;
  using Out =
      evt::Sm80EVT<evt::VisitorCompute<cutlass::multiply_add, ElementD, float, kRound>, RowScale, ScaleAcc, Bias>;
  using Store = evt::VisitorAuxStore<ThreadMap, ElementD, kRound, StrideOut>;
  using Callbacks = evt::Sm80EVT<Store, Out>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<KernelFor<ElementAB, ElementD, Tile, Callbacks, kAlignD>>;

  static sq_status run(const void* A, const void* B, void* D, int M, int N, int K, const float* row_scale,
                       const float* col_scale, const void* bias, cudaStream_t stream) {
    typename Callbacks::Arguments epi{
        {
            {row_scale, 0.f, {}},                                   // RowScale
            {{col_scale, 0.f, {}}, {}, {}},                         // ScaleAcc = col_scale * acc
            {static_cast<const ElementD*>(bias), ElementD(0), {}},  // Bias (nullptr -> 0)
            {},
        },
        {static_cast<ElementD*>(D), {int64_t(N), _1{}, int64_t(M) * N}},
    };
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, 1, epi, A, B, nullptr,
                                  nullptr, 0, 0, 0, 0, K, K, 0, 0);
    return launch<Gemm>(args, stream, "sq_gemm (sm_80 path)");
  }
};

// W[m, n] = seg_scale * acc + W[m, n] on a float32 [M, ldw] workspace (one segment of one half).
template <class ElementAB, class Tile>
struct AccumGemm80 {
  static constexpr int kAlign = 4;
  using ThreadMap = ThreadMapFor<Tile, float, kAlign>;
  using Acc = evt::VisitorAccFetch;
  using Scale = evt::VisitorScalarBroadcast<float>;
  using Prev = evt::VisitorAuxLoad<ThreadMap, float, StrideOut>;
  using Sum = evt::Sm80EVT<evt::VisitorCompute<cutlass::multiply_add, float, float, kRound>, Scale, Acc, Prev>;
  using Store = evt::VisitorAuxStore<ThreadMap, float, kRound, StrideOut>;
  using Callbacks = evt::Sm80EVT<Store, Sum>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<KernelFor<ElementAB, float, Tile, Callbacks, kAlign>>;

  // A: [M, lda] (this segment starts at A), B: [N, ldb] (this segment starts at B), W: [M, N] float.
  static sq_status run(const void* A, int64_t lda, const void* B, int64_t ldb, float* W, int M, int N, int Kseg,
                       const float* scale, cudaStream_t stream) {
    typename Scale::Arguments s{};
    s.scalar_ptrs[0] = scale;
    typename Callbacks::Arguments epi{
        {s, {}, {W, 0.f, {int64_t(N), _1{}, int64_t(M) * N}}, {}},
        {W, {int64_t(N), _1{}, int64_t(M) * N}},
    };
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, Kseg}, 1, epi, A, B, nullptr,
                                  nullptr, 0, 0, 0, 0, lda, ldb, 0, 0);
    return launch<Gemm>(args, stream, "sq_gemm_segmented (sm_80 path)");
  }
};

// out[m, n] = (row_scale ? row_scale[m] : 1) * (col_scale[n] * W[m, n]) + bias[n]   (defined in gemm_sm80_api.cu)
sq_status seg80_finalize(const float* W, void* out, sq_dtype out_dtype, int M, int N, const float* row_scale,
                         const float* col_scale, const void* bias, cudaStream_t stream);

template <class ElementAB, class ElementD>
sq_status run_scaled(const void* A, const void* B, void* D, int M, int N, int K, const float* rs, const float* cs,
                     const void* bias, cudaStream_t s) {
  return M <= kSmallM ? ScaledGemm80<ElementAB, ElementD, TileSmall>::run(A, B, D, M, N, K, rs, cs, bias, s)
                      : ScaledGemm80<ElementAB, ElementD, TileLarge>::run(A, B, D, M, N, K, rs, cs, bias, s);
}

template <class ElementAB>
sq_status run_segmented(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                        SegTable const& seg, const float* rs, const float* cs, const void* bias, void* ws,
                        size_t ws_size, cudaStream_t s) {
  const size_t need = seg_gemm80_workspace(M, N);
  if (ws == nullptr || ws_size < need || !sq::aligned(ws, 16)) {
    sq::set_last_error("sq_gemm_segmented (sm_80 path): needs a 16-byte aligned workspace of %zu bytes (got %zu)",
                       need, ws_size);
    return SQ_ERR_INVALID;
  }
  float* W = static_cast<float*>(ws);
  if (cudaMemsetAsync(W, 0, need, s) != cudaSuccess) return sq::check_launch("sq_gemm_segmented (sm_80 path)");
  const auto* a = static_cast<const ElementAB*>(A);
  const auto* b = static_cast<const ElementAB*>(B);
  const int64_t lda = int64_t(seg.halves) * K;
  for (int h = 0; h < seg.halves; ++h) {
    int k0 = 0;
    for (int i = 0; i < seg.n; ++i) {
      const int k1 = seg.end_tile[i] * kSegTileK;
      const float* scale = seg.scale + h * seg.n + i;
      const ElementAB* ah = a + int64_t(h) * K + k0;
      sq_status st =
          M <= kSmallM
              ? AccumGemm80<ElementAB, TileSmall>::run(ah, lda, b + k0, K, W, M, N, k1 - k0, scale, s)
              : AccumGemm80<ElementAB, TileLarge>::run(ah, lda, b + k0, K, W, M, N, k1 - k0, scale, s);
      if (st != SQ_OK) return st;
      k0 = k1;
    }
  }
  return seg80_finalize(W, D, out, M, N, rs, cs, bias, s);
}

}  // namespace sm80

}  // namespace segquant

#define SQ_DEFINE_GEMM80_ENTRY(SUFFIX, ELEMENT_AB)                                                                 \
  namespace segquant {                                                                                         \
  sq_status gemm80_run_##SUFFIX(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,      \
                                const float* rs, const float* cs, const void* bias, cudaStream_t s) {          \
    switch (out) {                                                                                             \
      case SQ_BF16: return sm80::run_scaled<ELEMENT_AB, cutlass::bfloat16_t>(A, B, D, M, N, K, rs, cs, bias, s); \
      case SQ_FP16: return sm80::run_scaled<ELEMENT_AB, cutlass::half_t>(A, B, D, M, N, K, rs, cs, bias, s);   \
      default: return SQ_ERR_UNSUPPORTED;                                                                      \
    }                                                                                                          \
  }                                                                                                            \
  sq_status seg_gemm80_run_##SUFFIX(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,  \
                                    SegTable const& seg, const float* rs, const float* cs, const void* bias,   \
                                    void* ws, size_t wss, cudaStream_t s) {                                    \
    return sm80::run_segmented<ELEMENT_AB>(A, B, D, out, M, N, K, seg, rs, cs, bias, ws, wss, s);              \
  }                                                                                                            \
  }
