// Hopper block-scaled FP8 GEMM (1x128 activation groups x 128x128 weight blocks): CUTLASS's blockwise-scaling
// mainloop (the collective of CUTLASS example 67) applies both scales while promoting WGMMA partial sums into fp32
// every 128 of K; the epilogue adds the bias and converts once.
#pragma once

#include <cutlass/detail/blockwise_scale_layout.hpp>

#include "scaled_mm_sm90.cuh"

namespace fp8kern::sm90 {

template <class TileShape_, class ClusterShape_, class TileScheduler_ = void, bool kSwapAB_ = false>
struct BlockConfig {
  using TileShape = TileShape_;        // CTA tile (kernel M, kernel N, K); K must be 128, the scale block
  using ClusterShape = ClusterShape_;
  using TileScheduler = TileScheduler_;  // void: persistent data-parallel; StreamKScheduler: K split over SMs
  // Swapped, the kernel computes D^T = B A^T: the weights' 128-row blocks fill the MMA's M side and a decode-sized
  // M becomes the kernel's narrow N tile, instead of a 128-row activation tile that is mostly empty.
  static constexpr bool kSwapAB = kSwapAB_;
};

template <class Cfg, class ElementD_>
struct BlockScaledMm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementD_;
  using TileShape = typename Cfg::TileShape;
  static constexpr bool kSwap = Cfg::kSwapAB;
  using LayoutA = cutlass::layout::RowMajor;     // kernel A [kernel M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // kernel B [K, kernel N] column-major == [kernel N, K] row-major
  // Swapped, the kernel's D^T [n, m] stored column-major is exactly our row-major D [m, n].
  using LayoutD = cute::conditional_t<kSwap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static_assert(size<2>(TileShape{}) == 128, "one K tile per scale block");
  static_assert(!kSwap || size<0>(TileShape{}) % 128 == 0, "swapped, kernel M tiles hold whole 128-row weight blocks");

  // Scales K-major for both operands: activation scales [M, ceil(K/128)] and weight scales [ceil(N/128),
  // ceil(K/128)] row-major, the layouts fp8kern.quantize(granularity='group') and the checkpoints produce, so no
  // conversion is needed. Kernel A's scales come per 1 row (activations) or, swapped, per 128 rows (weights).
  // CUTLASS documents MN-major scales for sm90 (its TMA scale load needs them); K-major ones take the collective's
  // element-wise cp.async path, which addresses them through these layouts (any M, no padding). The GPU tests with
  // partial N and K blocks pin that behaviour across CUTLASS upgrades.
  using ScaleConfig = cute::conditional_t<
      kSwap, cutlass::detail::Sm90BlockwiseScaleConfig<128, 1, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>,
      cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  // Bias follows our n: the kernel's column, or its row when swapped.
  using Bias = cute::conditional_t<kSwap,
                                   fusion::Sm90ColBroadcast<0, TileShape, ElementD, float, Stride<_1, _0, int64_t>, 1>,
                                   fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, int64_t>, 1>>;
  using EpilogueTree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float,
                                                           cutlass::FloatRoundStyle::round_to_nearest>,
                                       fusion::Sm90AccFetch, Bias>;  // acc + bias, then to ElementD

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, typename Cfg::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlignD,
      ElementD, LayoutD, kAlignD,
      cutlass::epilogue::TmaWarpSpecializedCooperative, EpilogueTree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB,
      float, TileShape, typename Cfg::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, typename Cfg::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const BlockGemmProblem& p) { launch<Gemm>(arguments(p), p, "blockwise_sm90"); }
  static size_t workspace_size(const BlockGemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }

  // The mainloop has applied both scales to every k-block's partial sums before they are accumulated, so stream-K's
  // partial tiles add up like those of an unscaled GEMM.
  static typename Gemm::Arguments arguments(const BlockGemmProblem& p) {
    const int km = int(kSwap ? p.n : p.m), kn = int(kSwap ? p.m : p.n), kk = int(p.k);
    const void* pa = kSwap ? p.b : p.a;
    const void* pb = kSwap ? p.a : p.b;
    const float* sfa = kSwap ? p.scale_b : p.scale_a;  // kernel A's scales: the weights' blocks when swapped
    const float* sfb = kSwap ? p.scale_a : p.scale_b;
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA stride_a = make_stride(kSwap ? p.ldb : p.lda, Int<1>{}, int64_t(0));
    StrideB stride_b = make_stride(kSwap ? p.lda : p.ldb, Int<1>{}, int64_t(0));
    StrideD stride_d;
    if constexpr (kSwap) stride_d = make_stride(Int<1>{}, p.ldd, int64_t(0));
    else stride_d = make_stride(p.ldd, Int<1>{}, int64_t(0));
    const auto shape = make_shape(km, kn, kk, 1);
    const LayoutSFA layout_sfa = ScaleConfig::tile_atom_to_shape_SFA(shape);
    const LayoutSFB layout_sfb = ScaleConfig::tile_atom_to_shape_SFB(shape);

    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = sm_count(hw.device_id);
    typename Bias::Arguments bias_args{static_cast<const ElementD*>(p.bias), ElementD(0), {}};
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {km, kn, kk, 1},
        {static_cast<const ElementA*>(pa), stride_a, static_cast<const ElementB*>(pb), stride_b,
         sfa, layout_sfa, sfb, layout_sfb},
        {{{}, bias_args, {}}, nullptr, stride_d, static_cast<ElementD*>(p.d), stride_d},
        hw};
    return args;
  }
};

using BlockCfg128x128 = BlockConfig<Shape<_128, _128, _128>, Shape<_1, _2, _1>>;
// Few output tiles (decode-sized M, narrow N): stream-K, as for the per-token family (CUTLASS example 67 pairs this
// collective with the stream-K scheduler too).
using BlockCfgStreamK128x128 = BlockConfig<Shape<_128, _128, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler>;
// Decode-sized M (<= 32): swapped, a 128-row weight block x 32 tokens per tile (a quarter of the MMA work and of the
// accumulators a 128x128 tile spends on at most 32 real rows, so more pipeline stages fit), with the stream-K
// scheduler: its heuristic splits K when K has more than 8 tiles of 128 and the ceil(N/128) tiles leave over half a
// wave of SMs idle, and runs data-parallel otherwise.
using BlockCfgSwap128x32 = BlockConfig<Shape<_128, _32, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler, true>;

}  // namespace fp8kern::sm90

#define FP8KERN_SM90_BLOCK_INSTANTIATE(ElementD, CFG, NAME)                                      \
  namespace fp8kern::sm90 {                                                                      \
  void NAME(const BlockGemmProblem& p) { BlockScaledMm<CFG, ElementD>::run(p); }                 \
  size_t NAME##_workspace(const BlockGemmProblem& p) {                                           \
    return BlockScaledMm<CFG, ElementD>::workspace_size(p);                                      \
  }                                                                                              \
  }
