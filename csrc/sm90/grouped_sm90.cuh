// Hopper grouped FP8 GEMMs for mixture-of-experts layers: one launch runs every expert's GEMM. Group g multiplies
// rows [offsets[g], offsets[g+1]) of the activations (sorted by expert) with expert g's weights; the offsets live on
// the device, so the host never reads the per-expert row counts (no synchronization, CUDA-graph capturable). The
// group tile scheduler of CUTLASS's ptr-array kernels reads the problem shapes from device memory and skips empty
// groups. Two scale kinds:
// - block (1x128 activation groups x 128x128 weight blocks): CUTLASS's ptr-array blockwise-scaling mainloop (the
//   collective of CUTLASS example 68) applies both scales while promoting WGMMA partial sums into fp32 every 128 of K;
// - row/col (a scale per row of A, per-token or a per-tensor value repeated, and one per weight row, per-channel):
//   the ptr-array FP8 mainloop promotes partial sums every 128 of K, and the epilogue computes row * (col * acc)
//   from per-group pointers into the two vectors.
#pragma once

#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>

#include "scaled_mm_sm90.cuh"

namespace fp8kern::sm90 {

template <class ElementD_, bool kBlock_>
struct GroupedMm {
  static constexpr bool kBlock = kBlock_;
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementD_;
  using TileShape = Shape<_128, _128, _128>;  // K tile = the scale block, and 4 MMAs of K = 32 per promotion
  using ClusterShape = Shape<_1, _1, _1>;     // experts hold few tiles each: no multicast pairing across them
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (m_g, N, K) per group
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // [K, N] column-major == the weight's [N, K] row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  // Row/col epilogue: D = row[m] * (col[n] * acc), each vector from a per-group pointer (batch stride 0: the pointer
  // already points at the group's part), loaded element-wise so no alignment is needed.
  using RowScale = fusion::Sm90ColBroadcast<0, TileShape, float*, float, Stride<_1, _0, _0>, 1>;
  using ColScale = fusion::Sm90RowBroadcast<0, TileShape, float*, float, Stride<_0, _1, _0>, 1>;
  using RowColTree = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::multiplies, ElementD, float, kRound>, RowScale,
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ColScale, fusion::Sm90AccFetch>>;
  // Block: the mainloop applied the scales; D = acc, converted once.
  using Fusion = cute::conditional_t<kBlock, fusion::LinearCombination<ElementD, float, void, float>, RowColTree>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using OperandA = cute::conditional_t<kBlock, cute::tuple<LayoutA*, LayoutSFA*>, LayoutA*>;
  using OperandB = cute::conditional_t<kBlock, cute::tuple<LayoutB*, LayoutSFB*>, LayoutB*>;
  using Schedule = cute::conditional_t<kBlock, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                       cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, OperandA, kAlignAB,
      ElementB, OperandB, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // The per-group argument arrays the kernel reads, carved from the front of the caller's workspace (which must be
  // 128-byte aligned; each array starts 16-byte aligned); CUTLASS's own workspace (TMA descriptors per SM) follows
  // them at a 128-byte boundary. sa / sb point at each group's scales (block: its rows of scale_a and its
  // [ceil(N/128), ceil(K/128)] blocks; row/col: its part of the row vector and its column vector).
  struct Arrays {
    Shape3* shapes;
    const ElementA** a;
    const ElementB** b;
    ElementD** d;
    const float** sa;
    const float** sb;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    LayoutSFA* layout_sfa;  // block only: what the mainloop's arguments take (its collective rebuilds each
    LayoutSFB* layout_sfb;  // group's scale layouts from the group's shape, the same ones)
    void* cutlass_workspace;
    size_t bytes;  // of the arrays
  };

  static Arrays carve(void* base, int64_t groups) {
    Arrays r{};
    size_t off = 0;
    auto take = [&](auto*& field, size_t elem) {
      using T = std::remove_reference_t<decltype(field)>;
      field = base ? reinterpret_cast<T>(static_cast<char*>(base) + off) : nullptr;
      off += (elem * size_t(groups) + 15) / 16 * 16;
    };
    take(r.shapes, sizeof(Shape3));
    take(r.a, sizeof(void*));
    take(r.b, sizeof(void*));
    take(r.d, sizeof(void*));
    take(r.sa, sizeof(void*));
    take(r.sb, sizeof(void*));
    take(r.stride_a, sizeof(StrideA));
    take(r.stride_b, sizeof(StrideB));
    take(r.stride_d, sizeof(StrideD));
    if constexpr (kBlock) {
      take(r.layout_sfa, sizeof(LayoutSFA));
      take(r.layout_sfb, sizeof(LayoutSFB));
    }
    off = (off + 127) / 128 * 128;  // CUTLASS keeps TMA descriptors there: 64-byte alignment at least
    r.bytes = off;
    r.cutlass_workspace = base ? static_cast<char*>(base) + off : nullptr;
    return r;
  }

  static typename Gemm::Arguments arguments(const GroupedGemmProblem& p, const Arrays& arr) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = sm_count(hw.device_id);
    typename CollectiveMainloop::Arguments mainloop{};
    typename CollectiveEpilogue::Arguments epilogue{{}, nullptr, arr.stride_d, arr.d, arr.stride_d};
    if constexpr (kBlock) {
      mainloop = {arr.a, arr.stride_a, arr.b, arr.stride_b, arr.sa, arr.layout_sfa, arr.sb, arr.layout_sfb};
      auto& f = epilogue.thread;
      f.alpha = 1.0f;
      f.beta = 0.0f;
      f.alpha_ptr = nullptr;
      f.beta_ptr = nullptr;
      f.alpha_ptr_array = nullptr;
      f.beta_ptr_array = nullptr;
      f.dAlpha = {_0{}, _0{}, 0};
      f.dBeta = {_0{}, _0{}, 0};
    } else {
      mainloop = {arr.a, arr.stride_a, arr.b, arr.stride_b, 4};  // promote every 4 MMAs (128 of K)
      typename RowScale::Arguments row{arr.sa, 1.0f, {}};
      typename ColScale::Arguments col{arr.sb, 1.0f, {}};
      epilogue.thread = {row, {col, {}, {}}, {}};
    }
    // Problem shapes on the device only (nullptr for the host copy): the scheduler launches one persistent CTA per
    // SM and walks the groups' tiles from device memory.
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped, {int(p.groups), arr.shapes, nullptr},
                                    mainloop, epilogue, hw};
  }

  static size_t workspace_size(const GroupedGemmProblem& p) {
    const Arrays arr = carve(nullptr, p.groups);
    return arr.bytes + Gemm::get_workspace_size(arguments(p, arr));
  }

  static void run(const GroupedGemmProblem& p);
};

// One thread per group: the group's row range from the offsets, clamped into [0, rows] (so no offsets, however
// wrong, make the kernel touch memory outside the operands), and its pointers, strides and scale layouts.
template <class G>
__global__ void grouped_prep(GroupedGemmProblem p, typename G::Arrays arr) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  int64_t lo = p.offsets[g], hi = p.offsets[g + 1];
  lo = lo < 0 ? 0 : (lo > p.rows ? p.rows : lo);
  hi = hi < lo ? lo : (hi > p.rows ? p.rows : hi);
  const int m = int(hi - lo), n = int(p.n), k = int(p.k);
  arr.shapes[g] = typename G::Shape3{m, n, k};
  arr.a[g] = static_cast<const typename G::ElementA*>(p.a) + lo * p.lda;
  arr.b[g] = static_cast<const typename G::ElementB*>(p.b) + g * p.n * p.k;
  arr.d[g] = static_cast<typename G::ElementD*>(p.d) + lo * p.ldd;
  typename G::StrideA sa{};
  cute::get<0>(sa) = p.lda;
  typename G::StrideB sb{};
  cute::get<0>(sb) = p.k;
  typename G::StrideD sd{};
  cute::get<0>(sd) = p.ldd;
  arr.stride_a[g] = sa;
  arr.stride_b[g] = sb;
  arr.stride_d[g] = sd;
  if constexpr (G::kBlock) {
    const int64_t kb = (p.k + 127) / 128, nb = (p.n + 127) / 128;
    arr.sa[g] = p.scale_a + lo * kb;
    arr.sb[g] = p.scale_b + g * nb * kb;
    arr.layout_sfa[g] = G::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, n, k, 1));
    arr.layout_sfb[g] = G::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, n, k, 1));
  } else {
    arr.sa[g] = p.scale_a + lo;
    arr.sb[g] = p.scale_b + g * p.n;
  }
}

template <class ElementD, bool kBlock>
void GroupedMm<ElementD, kBlock>::run(const GroupedGemmProblem& p) {
  using Self = GroupedMm<ElementD, kBlock>;
  static_assert_fits_smem<Kernel>();
  const Arrays arr = carve(p.workspace, p.groups);
  const auto args = arguments(p, arr);
  const size_t need = arr.bytes + Gemm::get_workspace_size(args);
  FP8KERN_CHECK(need <= p.workspace_bytes, "grouped_gemm_sm90: needs ", need, " bytes of workspace, got ",
                p.workspace_bytes);
  FP8KERN_CHECK(Gemm::can_implement(args) == cutlass::Status::kSuccess, "grouped_gemm_sm90: CUTLASS cannot run "
                "N=", p.n, " K=", p.k, " with ", p.groups, " groups");
  const int threads = 128;
  grouped_prep<Self><<<unsigned((p.groups + threads - 1) / threads), threads, 0, p.stream>>>(p, arr);
  FP8KERN_CUDA_CHECK(cudaGetLastError());
  Gemm gemm;
  FP8KERN_CUTLASS_CHECK(gemm.initialize(args, arr.cutlass_workspace, p.stream));
  FP8KERN_CUTLASS_CHECK(gemm.run(p.stream));
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fp8kern::sm90

// NAME(problem) runs the grouped kernel of the problem's scale kind for output ElementD; NAME_workspace sizes it.
#define FP8KERN_SM90_GROUPED_INSTANTIATE(ElementD, NAME)                                   \
  namespace fp8kern::sm90 {                                                                \
  void NAME(const GroupedGemmProblem& p) {                                                 \
    if (p.block) GroupedMm<ElementD, true>::run(p);                                        \
    else GroupedMm<ElementD, false>::run(p);                                               \
  }                                                                                        \
  size_t NAME##_workspace(const GroupedGemmProblem& p) {                                   \
    return p.block ? GroupedMm<ElementD, true>::workspace_size(p)                          \
                   : GroupedMm<ElementD, false>::workspace_size(p);                        \
  }                                                                                        \
  }
