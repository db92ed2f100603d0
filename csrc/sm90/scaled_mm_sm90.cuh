// Hopper FP8 GEMM with per-tensor / per-token / per-channel scales and bias fused into the epilogue:
// TMA + WGMMA warp-specialized CUTLASS 3.x kernels (the building blocks of CUTLASS example 54) with an epilogue
// visitor tree computing D = scale_row * (scale_col * acc) + bias in fp32 and converting once.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "../common/check.h"
#include "../common/device_info.h"
#include "fp8kern/fp8kern.h"

#define FP8KERN_CUTLASS_CHECK(expr)                                                                  \
  do {                                                                                               \
    const cutlass::Status st_ = (expr);                                                              \
    if (st_ != cutlass::Status::kSuccess)                                                            \
      throw ::fp8kern::CudaError(::fp8kern::detail::cat("fp8kern: CUTLASS error '",                  \
                                                        cutlassGetStatusString(st_), "' at ", __FILE__, \
                                                        ":", __LINE__));                             \
  } while (0)

namespace fp8kern::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Output element type for a DType code.
template <DType D> struct OutType;
template <> struct OutType<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct OutType<DType::kFloat16> { using type = cutlass::half_t; };
template <> struct OutType<DType::kFloat32> { using type = float; };

// A kernel config: tile, cluster, schedules, whether A and B swap roles (small M), and the accumulation mode.
template <class TileShape_, class ClusterShape_, class MainloopSchedule_, class EpilogueSchedule_, bool kSwapAB_,
          class TileScheduler_ = void>
struct Config {
  using TileShape = TileShape_;                  // CTA tile (kernel M, kernel N, K)
  using ClusterShape = ClusterShape_;            // CTAs per cluster (TMA multicast)
  using MainloopSchedule = MainloopSchedule_;    // pingpong / cooperative, FP8 fast-accum or promoted
  using EpilogueSchedule = EpilogueSchedule_;
  static constexpr bool kSwapAB = kSwapAB_;      // kernel computes D^T = B A^T: tiny M lands on the MMA's N
  using TileScheduler = TileScheduler_;          // void: persistent data-parallel; StreamKScheduler: K split over SMs
};

// A kernel whose shared storage exceeds the per-block opt-in maximum would compile and then fail at launch: make
// that a build error (the stage counts are derived from the epilogue's carve-out, so this guards future edits).
template <class Kernel>
constexpr void static_assert_fits_smem() {
  static_assert(Kernel::SharedStorageSize <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes,
                "kernel shared storage exceeds Hopper's 227 KB per block");
}

// Checks that the mainloop and the tile scheduler can run the arguments and that the caller's workspace suffices
// (the Python layer sizes it with gemm_workspace_size; only stream-K needs any), then launches on p.stream. The
// epilogue's own can_implement is not asked: it demands the output's contiguous extent (N) be a multiple of 16
// bytes, while its TMA store only needs what the entry validated (a 16-byte aligned base and row stride); TMA clips
// the ragged last tile itself, so any N is written in bounds. (The mainloop's check sees K only; the operands' row
// strides are validated by the entry, validate_gemm.)
template <class Gemm, class Problem>
void launch(const typename Gemm::Arguments& args, const Problem& p, const char* what) {
  using Kernel = typename Gemm::GemmKernel;
  static_assert_fits_smem<Kernel>();
  const bool ok = Kernel::CollectiveMainloop::can_implement(args.problem_shape, args.mainloop);
  FP8KERN_CHECK(ok, what, ": the CUTLASS mainloop cannot run M=", p.m, " N=", p.n, " K=", p.k,
                " (K must be a multiple of 16)");
  FP8KERN_CHECK(Kernel::TileScheduler::can_implement(args.scheduler), what,
                ": the CUTLASS tile scheduler rejects its arguments");
  const size_t ws = Gemm::get_workspace_size(args);
  FP8KERN_CHECK(ws <= p.workspace_bytes, what, ": needs ", ws, " bytes of workspace, got ", p.workspace_bytes);
  Gemm gemm;
  FP8KERN_CUTLASS_CHECK(gemm.initialize(args, p.workspace, p.stream));
  FP8KERN_CUTLASS_CHECK(gemm.run(p.stream));
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

template <class Cfg, class ElementD_>
struct ScaledMm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementD_;
  using ElementAcc = float;
  using TileShape = typename Cfg::TileShape;
  using LayoutA = cutlass::layout::RowMajor;     // kernel A [M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // kernel B as [K, N] column-major == [N, K] row-major
  // Swapped, the kernel's D^T [n, m] stored column-major is exactly our row-major D [m, n].
  using LayoutD = cute::conditional_t<Cfg::kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignAB = 16;                     // elements: 16 bytes of e4m3 (TMA)
  static constexpr int kAlignD = 16 / sizeof(ElementD);   // 16 bytes of output (TMA)
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // Epilogue tree. Kernel rows carry one scale, kernel columns the other; each is a vector or a scalar at run time
  // (a bool stride). Bias follows our n, which is the kernel's row when swapped; a null bias reads as 0.
  // Vector loads are element-wise (alignment 1) so M and N need no padding and scale views need no alignment.
  using RowScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, int64_t>, 1>;
  using ColScale = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, int64_t>, 1>;
  using Bias = cute::conditional_t<Cfg::kSwapAB,
                                   fusion::Sm90ColBroadcast<0, TileShape, ElementD, float, Stride<_1, _0, int64_t>, 1>,
                                   fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, int64_t>, 1>>;
  using ScaledAcc = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,  // col * acc
                                    ColScale, fusion::Sm90AccFetch>;
  using EpilogueTree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiply_add, ElementD, float, kRound>,
                                       RowScale, ScaledAcc, Bias>;  // row * (col * acc) + bias, then to ElementD

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, typename Cfg::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, LayoutD, kAlignD,          // no C operand
      ElementD, LayoutD, kAlignD,
      typename Cfg::EpilogueSchedule, EpilogueTree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, LayoutA, kAlignAB,
      ElementB, LayoutB, kAlignAB,
      ElementAcc, TileShape, typename Cfg::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, typename Cfg::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const GemmProblem& p) { launch<Gemm>(arguments(p), p, "scaled_mm_sm90"); }
  static size_t workspace_size(const GemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }

  static typename Gemm::Arguments arguments(const GemmProblem& p) {
    constexpr bool swap = Cfg::kSwapAB;
    const int km = int(swap ? p.n : p.m), kn = int(swap ? p.m : p.n), kk = int(p.k);
    const void* pa = swap ? p.b : p.a;
    const void* pb = swap ? p.a : p.b;
    const int64_t lda = swap ? p.ldb : p.lda, ldb = swap ? p.lda : p.ldb;
    const float* row_scale = swap ? p.scale_b : p.scale_a;
    const float* col_scale = swap ? p.scale_a : p.scale_b;
    const bool row_vec = swap ? p.scale_b_vector : p.scale_a_vector;
    const bool col_vec = swap ? p.scale_a_vector : p.scale_b_vector;

    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA stride_a = make_stride(lda, Int<1>{}, int64_t(0));
    StrideB stride_b = make_stride(ldb, Int<1>{}, int64_t(0));
    StrideD stride_d;
    if constexpr (swap) stride_d = make_stride(Int<1>{}, p.ldd, int64_t(0));
    else stride_d = make_stride(p.ldd, Int<1>{}, int64_t(0));

    typename RowScale::Arguments row_args{row_scale, 1.0f, {row_vec, {}, 0}};
    typename ColScale::Arguments col_args{col_scale, 1.0f, {{}, col_vec, 0}};
    typename Bias::Arguments bias_args{static_cast<const ElementD*>(p.bias), ElementD(0), {}};

    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = sm_count(hw.device_id);

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {km, kn, kk, 1},
        {static_cast<const ElementA*>(pa), stride_a, static_cast<const ElementB*>(pb), stride_b},
        {{row_args, {col_args, {}, {}}, bias_args, {}},
         nullptr, stride_d, static_cast<ElementD*>(p.d), stride_d},
        hw};
    // Stream-K keeps its defaults: a heuristic picks data-parallel, split-K or stream-K per problem, and partial
    // tiles are reduced in a fixed order, so results do not depend on timing.
    return args;
  }
};

using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;                  // promoted accumulation
using PingpongFast = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CooperativeFast = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using EpiPingpong = cutlass::epilogue::TmaWarpSpecialized;
using EpiCooperative = cutlass::epilogue::TmaWarpSpecializedCooperative;

// The config table's kernels (ids in csrc/dispatch/gemm_configs.h); kFast picks FP8 fast accumulation, otherwise
// WGMMA partial sums are promoted into fp32 registers every 4 MMAs (128 of K).
// K tiles are 128 so the promoted flavour's promotion interval (4 MMAs of K=32) divides the tile's 4 MMAs.
template <bool kFast>
using CfgSwap64x32 = Config<Shape<_64, _32, _128>, Shape<_1, _1, _1>,
                            cute::conditional_t<kFast, PingpongFast, Pingpong>, EpiPingpong, true>;
template <bool kFast>
using CfgSwap64x64 = Config<Shape<_64, _64, _128>, Shape<_1, _1, _1>,
                            cute::conditional_t<kFast, PingpongFast, Pingpong>, EpiPingpong, true>;
template <bool kFast>
using Cfg128x128 = Config<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                          cute::conditional_t<kFast, CooperativeFast, Cooperative>, EpiCooperative, false>;
// Fewer output tiles than SMs: stream-K spreads the K loop of the tiles over all SMs and reduces partial tiles in a
// workspace (sized per problem by gemm_workspace_size).
template <bool kFast>
using CfgStreamK128x128 = Config<Shape<_128, _128, _128>, Shape<_1, _1, _1>,
                                 cute::conditional_t<kFast, CooperativeFast, Cooperative>, EpiCooperative, false,
                                 cutlass::gemm::StreamKScheduler>;

}  // namespace fp8kern::sm90

// Defines fp8kern::sm90::NAME(problem) running config template CFG for output ElementD in either accumulation mode,
// and NAME_workspace(problem), the workspace bytes it needs.
#define FP8KERN_SM90_INSTANTIATE(ElementD, CFG, NAME)                                   \
  namespace fp8kern::sm90 {                                                             \
  void NAME(const GemmProblem& p) {                                                     \
    if (p.fast_accum) ScaledMm<CFG<true>, ElementD>::run(p);                            \
    else ScaledMm<CFG<false>, ElementD>::run(p);                                        \
  }                                                                                     \
  size_t NAME##_workspace(const GemmProblem& p) {                                       \
    return p.fast_accum ? ScaledMm<CFG<true>, ElementD>::workspace_size(p)              \
                        : ScaledMm<CFG<false>, ElementD>::workspace_size(p);            \
  }                                                                                     \
  }
