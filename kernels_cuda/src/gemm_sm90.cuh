// Scaled int8 / fp8 GEMM for Hopper (sm_90a): CUTLASS 3 TMA warp-specialized mainloop with an
// epilogue visitor tree computing  D = row_scale[m] * (col_scale[n] * acc) + bias[n]  in float32.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "segquant_kernels.h"

namespace segquant {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <class ElementAB, class ElementD, class TileShape, class ClusterShape, class MainloopSchedule,
          class EpilogueSchedule, class TileScheduler>
struct ScaledGemm {
  using ElementAcc = std::conditional_t<std::is_same_v<ElementAB, int8_t>, int32_t, float>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // B given as [N, K] row-major = K x N column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using Acc = fusion::Sm90AccFetch;
  // col_scale varies along N (one value per output channel), row_scale along M (per token).
  using ColScale = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using RowScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, _0>>;
  using ScaleAcc = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ColScale, Acc>;
  using Epilogue =
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>, RowScale,
                      ScaleAcc, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD,
      LayoutD, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB, ElementAB, LayoutB,
      kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* A, const void* B, void* D, int M, int N, int K,
                                            const float* row_scale, const float* col_scale, const void* bias) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const ElementAB*>(A), sa, static_cast<const ElementAB*>(B), sb},
        {{}, nullptr, sd, static_cast<ElementD*>(D), sd}};
    args.epilogue.thread = {
        {row_scale, 0.f, {}},                               // RowScale
        {{col_scale, 0.f, {}}, {}, {}},                     // ScaleAcc = col_scale * acc
        {static_cast<const ElementD*>(bias), ElementD(0), {}},  // Bias (nullptr -> 0)
        {}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    auto args = arguments(nullptr, nullptr, nullptr, M, N, K, nullptr, nullptr, nullptr);
    return Gemm::get_workspace_size(args);
  }

  static sq_status run(const void* A, const void* B, void* D, int M, int N, int K, const float* row_scale,
                       const float* col_scale, const void* bias, void* workspace, size_t ws_size,
                       cudaStream_t stream) {
    auto args = arguments(A, B, D, M, N, K, row_scale, col_scale, bias);
    Gemm gemm;
    if (Gemm::get_workspace_size(args) > ws_size) return SQ_ERR_INVALID;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return SQ_ERR_UNSUPPORTED;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return SQ_ERR_CUDA;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return SQ_ERR_CUDA;
    return cudaGetLastError() == cudaSuccess ? SQ_OK : SQ_ERR_CUDA;
  }
};

// Two configurations per element type:
//  * Large: 128x256 tiles, 2x1 cluster, cooperative (two consumer warpgroups), persistent.
//  * Small M (<= 64): 64x128 tiles so more CTAs stream the weight, pingpong, persistent.
template <class ElementAB, class ElementD>
using LargeGemm = ScaledGemm<ElementAB, ElementD, Shape<_128, _256, _128>, Shape<_2, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                             cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler>;
// fp8 keeps a second (promotion) accumulator per thread for exact-ish fp32 accumulation: at 128x256 the
// two accumulator sets need ~256 registers per thread and spill, so fp8 uses 128x128 tiles.
template <class ElementAB, class ElementD>
using LargeGemmFp8 = ScaledGemm<ElementAB, ElementD, Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                                cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler>;
template <class ElementAB, class ElementD>
using SmallGemm = ScaledGemm<ElementAB, ElementD, Shape<_64, _128, _128>, Shape<_1, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                             cutlass::epilogue::TmaWarpSpecialized, cutlass::gemm::PersistentScheduler>;

// Entry points, one translation unit per A/B element type (compiled in parallel).
size_t gemm_workspace_int8(sq_dtype out, int M, int N, int K);
sq_status gemm_run_int8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                        const float* rs, const float* cs, const void* bias, void* ws, size_t ws_size,
                        cudaStream_t stream);
size_t gemm_workspace_fp8(sq_dtype out, int M, int N, int K);
sq_status gemm_run_fp8(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,
                       const float* rs, const float* cs, const void* bias, void* ws, size_t ws_size,
                       cudaStream_t stream);

constexpr int kSmallM = 64;

}  // namespace segquant

#define SQ_DEFINE_GEMM_ENTRY(SUFFIX, ELEMENT_AB, LARGE)                                                               \
  namespace segquant {                                                                                        \
  template <class ElementD>                                                                                   \
  static size_t ws_##SUFFIX(int M, int N, int K) {                                                            \
    return M <= kSmallM ? SmallGemm<ELEMENT_AB, ElementD>::workspace(M, N, K)                                 \
                        : LARGE<ELEMENT_AB, ElementD>::workspace(M, N, K);                                \
  }                                                                                                           \
  template <class ElementD>                                                                                   \
  static sq_status run_##SUFFIX(const void* A, const void* B, void* D, int M, int N, int K, const float* rs,  \
                                const float* cs, const void* bias, void* ws, size_t wss, cudaStream_t s) {    \
    return M <= kSmallM ? SmallGemm<ELEMENT_AB, ElementD>::run(A, B, D, M, N, K, rs, cs, bias, ws, wss, s)    \
                        : LARGE<ELEMENT_AB, ElementD>::run(A, B, D, M, N, K, rs, cs, bias, ws, wss, s);   \
  }                                                                                                           \
  size_t gemm_workspace_##SUFFIX(sq_dtype out, int M, int N, int K) {                                         \
    switch (out) {                                                                                            \
      case SQ_BF16: return ws_##SUFFIX<cutlass::bfloat16_t>(M, N, K);                                         \
      case SQ_FP16: return ws_##SUFFIX<cutlass::half_t>(M, N, K);                                             \
      default: return 0;                                                                                      \
    }                                                                                                         \
  }                                                                                                           \
  sq_status gemm_run_##SUFFIX(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,       \
                              const float* rs, const float* cs, const void* bias, void* ws, size_t wss,       \
                              cudaStream_t s) {                                                               \
    switch (out) {                                                                                            \
      case SQ_BF16: return run_##SUFFIX<cutlass::bfloat16_t>(A, B, D, M, N, K, rs, cs, bias, ws, wss, s);     \
      case SQ_FP16: return run_##SUFFIX<cutlass::half_t>(A, B, D, M, N, K, rs, cs, bias, ws, wss, s);         \
      default: return SQ_ERR_UNSUPPORTED;                                                                     \
    }                                                                                                         \
  }                                                                                                           \
  }
