// Ada FP8 GEMM (mma.sync e4m3, cp.async multistage; the CUTLASS 2.x building blocks of example 58) with per-tensor /
// per-token / per-channel scales and bias fused through an epilogue visitor tree: D = sa * (sb * acc) + bias.
// The same source compiles for sm_90a, so FP8KERN_BACKEND=sm89 runs it on Hopper for testing.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm_coord.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
// after the headers above: the visitor headers use their types without including them
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>

#include "../common/check.h"
#include "../common/device_info.h"
#include "fp8kern/fp8kern.h"

namespace fp8kern::sm89 {

using namespace cute;
namespace evt = cutlass::epilogue::threadblock;

template <class TileShape_, class WarpShape_, int kStages_>
struct Config {
  using TileShape = TileShape_;  // CTA tile (M, N, K)
  using WarpShape = WarpShape_;  // per-warp tile
  static constexpr int kStages = kStages_;  // cp.async pipeline depth (shared memory: stages x (M + N) x K bytes)
};

// kFast: mma.sync accumulates all of K in its accumulator (OpMultiplyAddFastAccum). Otherwise CUTLASS's sm89
// mainloop stages the accumulation (OpMultiplyAdd): each CTA K tile is summed in a fresh partial accumulator that is
// then added to the fp32 total, since Ada's FP8 MMA adds into its accumulator with reduced precision.
template <class Cfg, class ElementD, bool kFast>
struct ScaledMm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using TileShape = typename Cfg::TileShape;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  // One element per epilogue access: any N is stored and every scale/bias element is loaded under its own guard
  // (the row-broadcast visitor guards a vector by its first element only).
  static constexpr int kAlignD = 1;
  using ThreadMap = evt::OutputTileThreadLayout<TileShape, typename Cfg::WarpShape, ElementD, kAlignD, 1>;

  // Scale strides are run-time: 1 for a vector, 0 for a per-tensor scalar read by every row / column.
  using ScaleA = evt::VisitorColBroadcast<ThreadMap, float, Stride<int64_t, _0, _0>>;
  using ScaleB = evt::VisitorRowBroadcast<ThreadMap, float, Stride<_0, int64_t, _0>>;
  using Bias = evt::VisitorRowBroadcast<ThreadMap, ElementD, Stride<_0, _1, _0>>;  // null pointer reads as 0
  using ScaledAcc = evt::Sm80EVT<evt::VisitorCompute<cutlass::multiplies, float, float, kRound>, ScaleB,
                                 evt::VisitorAccFetch>;
  using Result = evt::Sm80EVT<evt::VisitorCompute<cutlass::multiply_add, ElementD, float, kRound>, ScaleA, ScaledAcc,
                              Bias>;
  using Store = evt::VisitorAuxStore<ThreadMap, ElementD, kRound, Stride<int64_t, _1, _0>>;
  using Epilogue = evt::Sm80EVT<Store, Result>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, 16,
      ElementB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16,
      ElementD, cutlass::layout::RowMajor, kAlignD,
      float, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm89,
      TileShape, typename Cfg::WarpShape, cutlass::gemm::GemmShape<16, 8, 32>,
      Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Cfg::kStages,
      cute::conditional_t<kFast, cutlass::arch::OpMultiplyAddFastAccum, cutlass::arch::OpMultiplyAdd>,
      1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const GemmProblem& p) {
    typename ScaleA::Arguments sa{p.scale_a, 1.0f, {p.scale_a_vector ? int64_t(1) : int64_t(0), {}, {}}};
    typename ScaleB::Arguments sb{p.scale_b, 1.0f, {{}, p.scale_b_vector ? int64_t(1) : int64_t(0), {}}};
    typename Bias::Arguments bias{static_cast<const ElementD*>(p.bias), ElementD(0), {}};
    typename Store::Arguments store{static_cast<ElementD*>(p.d), {p.ldd, {}, {}}};
    typename Epilogue::Arguments epilogue{{sa, {sb, {}, {}}, bias, {}}, store};

    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm,
                                  {int(p.m), int(p.n), int(p.k)}, 1, epilogue,
                                  p.a, p.b, nullptr, nullptr, 0, 0, 0, 0, p.lda, p.ldb, 0, 0);
    // The grid's y dimension counts N tiles and is limited to 65535 (N <= 4194240 with 64-column tiles).
    constexpr int64_t kTileN = TileShape::kN;
    FP8KERN_CHECK((p.n + kTileN - 1) / kTileN <= 65535, "scaled_mm_sm89: N=", p.n, " needs more than 65535 tiles of ",
                  kTileN, " columns; split the GEMM along N");
    Gemm gemm;
    const cutlass::Status ok = gemm.can_implement(args);
    FP8KERN_CHECK(ok == cutlass::Status::kSuccess, "scaled_mm_sm89: CUTLASS cannot run M=", p.m, " N=", p.n, " K=",
                  p.k, " with lda=", p.lda, " ldb=", p.ldb, " (", cutlassGetStatusString(ok), ")");
    FP8KERN_CHECK(Gemm::get_workspace_size(args) <= p.workspace_bytes, "scaled_mm_sm89: workspace too small");
    const cutlass::Status st = gemm.initialize(args, p.workspace, p.stream);
    FP8KERN_CHECK(st == cutlass::Status::kSuccess, "scaled_mm_sm89: initialize failed (", cutlassGetStatusString(st),
                  ")");
    const cutlass::Status rs = gemm.run(p.stream);
    if (rs != cutlass::Status::kSuccess)
      throw CudaError(detail::cat("fp8kern: scaled_mm_sm89 launch failed (", cutlassGetStatusString(rs), ")"));
    FP8KERN_CUDA_CHECK(cudaGetLastError());
  }
};

// Configs, ids and names in csrc/dispatch/gemm_configs.cpp. Each keeps 4 stages in 48 KB of shared memory (Ada has
// 99 KB per block). 128x128 tiles with 64x64 warps made ptxas spill (255 registers); 64x32 warps fit in 206.
// Small M: a 32-row tile and 64 columns, so decode-sized problems spread N / 64 CTAs over the SMs.
using Cfg32x64 = Config<cutlass::gemm::GemmShape<32, 64, 128>, cutlass::gemm::GemmShape<32, 32, 128>, 4>;
using Cfg64x128 = Config<cutlass::gemm::GemmShape<64, 128, 64>, cutlass::gemm::GemmShape<32, 32, 64>, 4>;
using Cfg128x64 = Config<cutlass::gemm::GemmShape<128, 64, 64>, cutlass::gemm::GemmShape<64, 32, 64>, 4>;

}  // namespace fp8kern::sm89

// Defines fp8kern::sm89::NAME(problem, config) running tile config `config` for output ElementD in the accumulation
// mode p.fast_accum asks for.
#define FP8KERN_SM89_INSTANTIATE(ElementD, NAME)                                \
  namespace fp8kern::sm89 {                                                     \
  template <bool kFast>                                                         \
  static void NAME##_mode(const GemmProblem& p, int config) {                   \
    switch (config) {                                                           \
      case 0: ScaledMm<Cfg32x64, ElementD, kFast>::run(p); break;               \
      case 1: ScaledMm<Cfg64x128, ElementD, kFast>::run(p); break;              \
      default: ScaledMm<Cfg128x64, ElementD, kFast>::run(p); break;             \
    }                                                                           \
  }                                                                             \
  void NAME(const GemmProblem& p, int config) {                                 \
    if (p.fast_accum) NAME##_mode<true>(p, config);                             \
    else NAME##_mode<false>(p, config);                                         \
  }                                                                             \
  }
