// K-segmented and DualScale int8 / fp8 GEMM for Hopper (sm_90a).
//
//   D[m, n] = row_scale[m] * col_scale[n] * sum_h sum_s seg_scale[h * nseg + s] *
//             sum_{k in segment s} A[m, h * K + k] * B[n, k]          + bias[n]
//
// h runs over `halves` (1, or 2 for DualScale, where A = [Q+ | Q-] is [M, 2K] and both halves multiply
// the same weight B [N, K]); segments split K (e.g. attention heads of a concat/head-merge input).
//
// The mainloop is CUTLASS 3's TMA warp-specialized GMMA pipeline with two changes, both in a
// collective of our own that derives from CUTLASS's `MainloopSm90TmaGmmaWarpSpecialized` collective:
//
// * Accumulation: GMMA accumulates a segment into a register fragment of the MMA's own type (int32 for
//   int8, float for fp8); at the segment's last k-tile the consumer waits for its GMMAs, then
//   *promotes* the fragment into float accumulators, `acc += float(frag) * seg_scale` (exactly the op
//   contract's per-piece arithmetic: int32 dot products converted to float, scaled, summed in float).
//   fp8 also promotes every kFp8PromoteTiles k-tiles inside long segments (Hopper's fp8 GMMA
//   accumulates with reduced precision; CUTLASS's default fp8 mainloop promotes every 4 k-blocks too).
// * DualScale without a second copy of W: the k-loop interleaves the halves (tile t: half t % 2,
//   k-tile t / 2), so the two stages that read the same weight tile are adjacent and the second read
//   hits L2; each half accumulates into its own fragment. W streams from memory once.
//
// The kernel (CUTLASS `GemmUniversal`, cooperative or pingpong, persistent, no split-K) partitions its
// accumulators with the float `TiledMma` we expose; the GMMA C-fragment layout is the same for every
// 32-bit accumulator type, so the int32 fragments line up element for element. The epilogue is the
// row x column scale + bias visitor tree of gemm_sm90.cuh.
//
// Segment boundaries must be multiples of the tile K (64): attention heads of 64/128, and whole-K
// DualScale halves, are. Other tables are rejected at the C API (SQ_ERR_UNSUPPORTED -> reference).
#pragma once

#include "gemm_seg_table.h"
#include "gemm_sm90.cuh"

namespace segquant {

constexpr int kFp8PromoteTiles = 2;  // 2 x 64 = 128 K elements between fp8 promotions (4 GMMA k-blocks)

template <class Base, class TiledMmaF32>
struct SegCollective : Base {
  using typename Base::DispatchPolicy;
  using typename Base::TileShape;
  using typename Base::ElementA;
  using typename Base::StrideA;
  using typename Base::ElementB;
  using typename Base::StrideB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;

  using TiledMmaQ = typename Base::TiledMma;  // the GMMA that runs (s32 or f32 accumulators)
  using TiledMma = TiledMmaF32;               // what the kernel builds its (float) accumulators with
  using ElementAccumulator = float;
  using ElementQAcc = typename TiledMmaQ::ValTypeC;
  static constexpr bool kIsFp8 = cute::is_same_v<ElementQAcc, float>;
  static_assert(cute::size<2>(TileShape{}) == kSegTileK, "segmented GEMM tiles K by kSegTileK");

  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    SegTable seg;
  };

  struct Params : Base::Params {
    SegTable seg;
  };

  // problem_shape K is A's (and the k-loop's) extent: halves * K_B; B's tensor map covers [N, K_B] only
  // (the k-loop wraps onto it for DualScale).
  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void*) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    int const KB = K / args.seg.halves;
    auto ptr_A = reinterpret_cast<InternalElementA const*>(args.ptr_A);
    auto ptr_B = reinterpret_cast<InternalElementB const*>(args.ptr_B);
    Tensor tensor_a = make_tensor(ptr_A, make_layout(make_shape(M, K, L), args.dA));
    Tensor tensor_b = make_tensor(ptr_B, make_layout(make_shape(N, KB, L), args.dB));
    using ClusterShape = typename DispatchPolicy::ClusterShape;
    auto tma_load_a = make_tma_copy_A_sm90(GmemTiledCopyA{}, tensor_a, SmemLayoutA{}(_, _, cute::Int<0>{}),
                                           TileShape{}, ClusterShape{});
    auto tma_load_b = make_tma_copy_B_sm90(GmemTiledCopyB{}, tensor_b, SmemLayoutB{}(_, _, cute::Int<0>{}),
                                           TileShape{}, ClusterShape{});
    typename Base::Params base{tma_load_a, tma_load_b, Base::TmaTransactionBytes, Base::TmaTransactionBytesMK,
                               Base::TmaTransactionBytesNK};
    return Params{base, args.seg};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    if (args.seg.halves < 1 || args.seg.halves > 2 || K % (args.seg.halves * kSegTileK) != 0) return false;
    int const KB = K / args.seg.halves;
    constexpr int align_a = 128 / cutlass::sizeof_bits<ElementA>::value;
    constexpr int align_b = 128 / cutlass::sizeof_bits<ElementB>::value;
    return cutlass::detail::check_alignment<align_a>(cute::make_shape(M, K, L), StrideA{}) &&
           cutlass::detail::check_alignment<align_b>(cute::make_shape(N, KB, L), StrideB{});
  }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    int const KB = K / params.seg.halves;
    Tensor mA_mkl = params.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB_nkl = params.tma_load_b.get_tma_tensor(make_shape(N, KB, L));
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});  // (BM,BK,m,k,l)
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});  // (BN,BK,n,k,l)
    return cute::make_tuple(gA_mkl, gB_nkl);
  }

  // k-tile t of the loop -> (A k-tile, B k-tile). DualScale interleaves the halves.
  CUTLASS_DEVICE static void tile_coords(SegTable const& seg, int t, int& a_tile, int& b_tile, int& half) {
    if (seg.halves == 2) {
      half = t & 1;
      b_tile = t >> 1;
      a_tile = half * seg.k_tiles + b_tile;
    } else {
      half = 0;
      b_tile = t;
      a_tile = t;
    }
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);
    auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(gA_mkl(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tAsA = block_tma_a.partition_D(sA);                                  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));  // (TMA,TMA_N,TMA_K,k)
    Tensor tBsB = block_tma_b.partition_D(sB);                                  // (TMA,TMA_N,TMA_K,PIPE)

    uint16_t mcast_mask_a = 0;
    uint16_t mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
      }
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
      }
    }

    int t = *k_tile_iter;  // the persistent scheduler always starts at k-tile 0 (no split-K)
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++t) {
      int a_tile, b_tile, half;
      tile_coords(params.seg, t, a_tile, b_tile, half);
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      int const stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, a_tile), tAsA(_, _, _, stage));
      copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, b_tile), tBsB(_, _, _, stage));
      ++smem_pipe_write;
    }
  }

  template <class FragF, class FragQ>
  CUTLASS_DEVICE static void promote(FragF& acc, FragQ const& frag, float scale) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      acc(i) += static_cast<float>(frag(i)) * scale;
    }
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int MmaWarpGroups = size(TiledMmaQ{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMmaQ tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,MMA_N,MMA_K,PIPE)

    auto frag0 = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));  // half 0 (or the only half)
    auto frag1 = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));  // half 1 (DualScale)
    CUTE_STATIC_ASSERT_V(size(frag0) == size(accum));

    SegTable const& seg = params.seg;
    int const halves = seg.halves;
    clear(accum);
    int s = 0;                       // current segment (the same for both interleaved halves)
    int seg_end = seg.end_tile[0];   // its exclusive end, in k-tiles of a half
    int since_promote = 0;           // k-tiles of a half since the last promotion (fp8 cadence)
    bool fresh0 = true, fresh1 = true;
    PipelineState smem_pipe_release = smem_pipe_read;
    int outstanding = 0;             // stages read but not yet released

    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < k_tile_count; ++t) {
      int a_tile, b_tile, half;
      tile_coords(seg, t, a_tile, b_tile, half);
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      int const stage = smem_pipe_read.index();
      warpgroup_fence_operand(frag0);
      warpgroup_fence_operand(frag1);
      warpgroup_arrive();
      if (half == 0) {
        tiled_mma.accumulate_ = fresh0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
        CUTLASS_PRAGMA_UNROLL
        for (int kb = 0; kb < size<2>(tCrA); ++kb) {
          cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), frag0);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        fresh0 = false;
      } else {
        tiled_mma.accumulate_ = fresh1 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
        CUTLASS_PRAGMA_UNROLL
        for (int kb = 0; kb < size<2>(tCrA); ++kb) {
          cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), frag1);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        fresh1 = false;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
      ++outstanding;

      bool const last_half = (half == halves - 1);
      if (last_half) ++since_promote;
      bool const boundary = last_half && (b_tile + 1 == seg_end);
      bool const cadence = kIsFp8 && last_half && since_promote >= kFp8PromoteTiles;
      if (boundary || cadence) {
        warpgroup_wait<0>();
        warpgroup_fence_operand(frag0);
        warpgroup_fence_operand(frag1);
        for (; outstanding > 0; --outstanding) {
          pipeline.consumer_release(smem_pipe_release);
          ++smem_pipe_release;
        }
        promote(accum, frag0, __ldg(seg.scale + s));
        if (halves == 2) promote(accum, frag1, __ldg(seg.scale + seg.n + s));
        fresh0 = fresh1 = true;
        since_promote = 0;
        if (boundary && s + 1 < seg.n) seg_end = seg.end_tile[++s];
      } else if (outstanding > 1) {
        warpgroup_wait<1>();  // keep one GMMA batch in flight, free the older stage
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
        --outstanding;
      }
    }
    warpgroup_fence_operand(accum);
  }

  // mma() has waited for every GMMA and released every stage it read (its last k-tile ends a segment).
  CUTLASS_DEVICE void mma_tail(MainloopPipeline, PipelineState, int) {}
};

// The GEMM: SegCollective over CUTLASS's TMA warp-specialized mainloop, the scaled epilogue of
// gemm_sm90.cuh (float accumulators), persistent tile scheduler.
template <class ElementAB, class ElementD, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct SegGemm {
  using ElementQAcc = std::conditional_t<std::is_same_v<ElementAB, int8_t>, int32_t, float>;
  using Epi = ScaledGemm<ElementAB, ElementD, TileShape, ClusterShape, KernelSchedule, EpilogueSchedule,
                         cutlass::gemm::PersistentScheduler>;
  // The epilogue must see float accumulators (the promoted sums), also for int8.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, typename Epi::LayoutD, Epi::kAlignD,
      ElementD, typename Epi::LayoutD, Epi::kAlignD, EpilogueSchedule, typename Epi::Epilogue>::CollectiveOp;

  static constexpr bool kCooperative =
      cute::is_base_of_v<cutlass::gemm::KernelTmaWarpSpecializedCooperative, KernelSchedule>;
  using AtomLayout = cute::conditional_t<kCooperative, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _1, _1>>>;
  using TiledMmaQ = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<ElementAB, ElementAB, ElementQAcc, TileShape, GMMA::Major::K, GMMA::Major::K>(),
      AtomLayout{}));
  using TiledMmaF32 = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float, TileShape, GMMA::Major::K,
                                 GMMA::Major::K>(),
      AtomLayout{}));
  using SmemLayoutAtomA = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                   GMMA::Major::K, ElementAB, decltype(get<0>(TileShape{})), decltype(get<2>(TileShape{}))>());
  using SmemLayoutAtomB = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                   GMMA::Major::K, ElementAB, decltype(get<1>(TileShape{})), decltype(get<2>(TileShape{}))>());
  static constexpr int kStages = cutlass::gemm::collective::detail::compute_stage_count_or_override<
      cutlass::gemm::collective::detail::sm90_smem_capacity_bytes, ElementAB, ElementAB, TileShape>(
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>{});
  using GmemCopyA = decltype(cutlass::gemm::collective::detail::sm90_cluster_shape_to_tma_atom(shape<1>(ClusterShape{})));
  using GmemCopyB = decltype(cutlass::gemm::collective::detail::sm90_cluster_shape_to_tma_atom(shape<0>(ClusterShape{})));
  using BaseCollective = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm90TmaGmmaWarpSpecialized<kStages, ClusterShape, KernelSchedule>, TileShape, ElementAB,
      cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>, ElementAB,
      cutlass::gemm::TagToStrideB_t<cutlass::layout::ColumnMajor>, TiledMmaQ, GmemCopyA, SmemLayoutAtomA, void,
      cute::identity, GmemCopyB, SmemLayoutAtomB, void, cute::identity>;
  using CollectiveMainloop = SegCollective<BaseCollective, TiledMmaF32>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // K is the weight's K (per half); A is [M, halves * K].
  static typename Gemm::Arguments arguments(const void* A, const void* B, void* D, int M, int N, int K,
                                            SegTable const& seg, const float* row_scale, const float* col_scale,
                                            const void* bias) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    int const KA = K * seg.halves;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, KA, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, KA, 1},
        {static_cast<const ElementAB*>(A), sa, static_cast<const ElementAB*>(B), sb, seg},
        {{}, nullptr, sd, static_cast<ElementD*>(D), sd}};
    args.epilogue.thread = {
        {row_scale, 1.f, {}},                                   // RowScale (nullptr -> 1)
        {{col_scale, 0.f, {}}, {}, {}},                         // ScaleAcc = col_scale * acc
        {static_cast<const ElementD*>(bias), ElementD(0), {}},  // Bias (nullptr -> 0)
        {}};
    return args;
  }

  static size_t workspace(int M, int N, int K, SegTable const& seg) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, M, N, K, seg, nullptr, nullptr, nullptr));
  }

  static sq_status run(const void* A, const void* B, void* D, int M, int N, int K, SegTable const& seg,
                       const float* row_scale, const float* col_scale, const void* bias, void* workspace,
                       size_t ws_size, cudaStream_t stream) {
    auto args = arguments(A, B, D, M, N, K, seg, row_scale, col_scale, bias);
    Gemm gemm;
    if (Gemm::get_workspace_size(args) > ws_size) return SQ_ERR_INVALID;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return SQ_ERR_UNSUPPORTED;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return SQ_ERR_CUDA;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return SQ_ERR_CUDA;
    return cudaGetLastError() == cudaSuccess ? SQ_OK : SQ_ERR_CUDA;
  }
};

// Large M: 128x128x64 tiles, 2x1 cluster, cooperative. Small M (<= 64): 64x128x64, pingpong.
template <class ElementAB, class ElementD>
using LargeSegGemm = SegGemm<ElementAB, ElementD, Shape<_128, _128, _64>, Shape<_2, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                             cutlass::epilogue::TmaWarpSpecializedCooperative>;
template <class ElementAB, class ElementD>
using SmallSegGemm = SegGemm<ElementAB, ElementD, Shape<_64, _128, _64>, Shape<_1, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized>;


}  // namespace segquant

#define SQ_DEFINE_SEG_GEMM_ENTRY(SUFFIX, ELEMENT_AB)                                                          \
  namespace segquant {                                                                                        \
  template <class ElementD>                                                                                   \
  static size_t seg_ws_##SUFFIX(int M, int N, int K, SegTable const& seg) {                                   \
    return M <= kSmallM ? SmallSegGemm<ELEMENT_AB, ElementD>::workspace(M, N, K, seg)                         \
                        : LargeSegGemm<ELEMENT_AB, ElementD>::workspace(M, N, K, seg);                        \
  }                                                                                                           \
  template <class ElementD>                                                                                   \
  static sq_status seg_run_##SUFFIX(const void* A, const void* B, void* D, int M, int N, int K,               \
                                    SegTable const& seg, const float* rs, const float* cs, const void* bias,  \
                                    void* ws, size_t wss, cudaStream_t s) {                                   \
    return M <= kSmallM                                                                                       \
               ? SmallSegGemm<ELEMENT_AB, ElementD>::run(A, B, D, M, N, K, seg, rs, cs, bias, ws, wss, s)     \
               : LargeSegGemm<ELEMENT_AB, ElementD>::run(A, B, D, M, N, K, seg, rs, cs, bias, ws, wss, s);    \
  }                                                                                                           \
  size_t seg_gemm_workspace_##SUFFIX(sq_dtype out, int M, int N, int K, SegTable const& seg) {                \
    switch (out) {                                                                                            \
      case SQ_BF16: return seg_ws_##SUFFIX<cutlass::bfloat16_t>(M, N, K, seg);                                \
      case SQ_FP16: return seg_ws_##SUFFIX<cutlass::half_t>(M, N, K, seg);                                    \
      default: return 0;                                                                                      \
    }                                                                                                         \
  }                                                                                                           \
  sq_status seg_gemm_run_##SUFFIX(const void* A, const void* B, void* D, sq_dtype out, int M, int N, int K,   \
                                  SegTable const& seg, const float* rs, const float* cs, const void* bias,    \
                                  void* ws, size_t wss, cudaStream_t s) {                                     \
    switch (out) {                                                                                            \
      case SQ_BF16: return seg_run_##SUFFIX<cutlass::bfloat16_t>(A, B, D, M, N, K, seg, rs, cs, bias, ws, wss, s); \
      case SQ_FP16: return seg_run_##SUFFIX<cutlass::half_t>(A, B, D, M, N, K, seg, rs, cs, bias, ws, wss, s);     \
      default: return SQ_ERR_UNSUPPORTED;                                                                     \
    }                                                                                                         \
  }                                                                                                           \
  }
