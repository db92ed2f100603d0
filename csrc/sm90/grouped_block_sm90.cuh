// Hopper grouped block-scaled FP8 GEMM for mixture-of-experts layers: one launch runs every expert's GEMM.
// Group g multiplies rows [offsets[g], offsets[g+1]) of the activations (sorted by expert) with expert g's weights;
// the offsets live on the device, so the host never reads the per-expert row counts (no synchronization, CUDA-graph
// capturable). CUTLASS's ptr-array blockwise-scaling mainloop (the collective of CUTLASS example 68) applies the 1x128
// activation and 128x128 weight scales while promoting WGMMA partial sums into fp32 every 128 of K; its group tile
// scheduler reads the problem shapes from device memory and skips empty groups.
#pragma once

#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>

#include "scaled_mm_sm90.cuh"

namespace fp8kern::sm90 {

template <class ElementD_>
struct GroupedBlockMm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementD_;
  using TileShape = Shape<_128, _128, _128>;  // K tile = the scale block
  using ClusterShape = Shape<_1, _1, _1>;     // experts hold few tiles each: no multicast pairing across them
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (m_g, N, K) per group
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // [K, N] column-major == the weight's [N, K] row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;  // D = acc, converted once

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // The per-group argument arrays the kernel reads, carved from the front of the caller's workspace (which must be
  // 128-byte aligned; each array starts 16-byte aligned); CUTLASS's own workspace (TMA descriptors per SM) follows
  // them at a 128-byte boundary.
  struct Arrays {
    Shape3* shapes;
    const ElementA** a;
    const ElementB** b;
    ElementD** d;
    const float** sfa;
    const float** sfb;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
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
    take(r.sfa, sizeof(void*));
    take(r.sfb, sizeof(void*));
    take(r.stride_a, sizeof(StrideA));
    take(r.stride_b, sizeof(StrideB));
    take(r.stride_d, sizeof(StrideD));
    take(r.layout_sfa, sizeof(LayoutSFA));
    take(r.layout_sfb, sizeof(LayoutSFB));
    off = (off + 127) / 128 * 128;  // CUTLASS keeps TMA descriptors there: 64-byte alignment at least
    r.bytes = off;
    r.cutlass_workspace = base ? static_cast<char*>(base) + off : nullptr;
    return r;
  }

  static typename Gemm::Arguments arguments(const GroupedBlockGemmProblem& p, const Arrays& arr) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = sm_count(hw.device_id);
    // Problem shapes on the device only (nullptr for the host copy): the scheduler launches one persistent CTA per
    // SM and walks the groups' tiles from device memory.
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {int(p.groups), arr.shapes, nullptr},
        {arr.a, arr.stride_a, arr.b, arr.stride_b, arr.sfa, arr.layout_sfa, arr.sfb, arr.layout_sfb},
        {{}, nullptr, arr.stride_d, arr.d, arr.stride_d},
        hw};
    auto& f = args.epilogue.thread;
    f.alpha = 1.0f;
    f.beta = 0.0f;
    f.alpha_ptr = nullptr;
    f.beta_ptr = nullptr;
    f.alpha_ptr_array = nullptr;
    f.beta_ptr_array = nullptr;
    f.dAlpha = {_0{}, _0{}, 0};
    f.dBeta = {_0{}, _0{}, 0};
    return args;
  }

  static size_t workspace_size(const GroupedBlockGemmProblem& p) {
    const Arrays arr = carve(nullptr, p.groups);
    return arr.bytes + Gemm::get_workspace_size(arguments(p, arr));
  }

  static void run(const GroupedBlockGemmProblem& p);
};

// One thread per group: the group's row range from the offsets, clamped into [0, rows] (so no offsets, however
// wrong, make the kernel touch memory outside the operands), and its pointers, strides and scale layouts.
template <class G>
__global__ void grouped_block_prep(GroupedBlockGemmProblem p, typename G::Arrays arr) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  int64_t lo = p.offsets[g], hi = p.offsets[g + 1];
  lo = lo < 0 ? 0 : (lo > p.rows ? p.rows : lo);
  hi = hi < lo ? lo : (hi > p.rows ? p.rows : hi);
  const int m = int(hi - lo), n = int(p.n), k = int(p.k);
  const int64_t kb = (p.k + 127) / 128, nb = (p.n + 127) / 128;
  arr.shapes[g] = typename G::Shape3{m, n, k};
  arr.a[g] = static_cast<const typename G::ElementA*>(p.a) + lo * p.lda;
  arr.b[g] = static_cast<const typename G::ElementB*>(p.b) + g * p.n * p.k;
  arr.d[g] = static_cast<typename G::ElementD*>(p.d) + lo * p.ldd;
  arr.sfa[g] = p.scale_a + lo * kb;
  arr.sfb[g] = p.scale_b + g * nb * kb;
  typename G::StrideA sa{};
  cute::get<0>(sa) = p.lda;
  typename G::StrideB sb{};
  cute::get<0>(sb) = p.k;
  typename G::StrideD sd{};
  cute::get<0>(sd) = p.ldd;
  arr.stride_a[g] = sa;
  arr.stride_b[g] = sb;
  arr.stride_d[g] = sd;
  arr.layout_sfa[g] = G::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, n, k, 1));
  arr.layout_sfb[g] = G::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, n, k, 1));
}

template <class ElementD>
void GroupedBlockMm<ElementD>::run(const GroupedBlockGemmProblem& p) {
  using Self = GroupedBlockMm<ElementD>;
  const Arrays arr = carve(p.workspace, p.groups);
  const auto args = arguments(p, arr);
  const size_t need = arr.bytes + Gemm::get_workspace_size(args);
  FP8KERN_CHECK(need <= p.workspace_bytes, "grouped_blockwise_sm90: needs ", need, " bytes of workspace, got ",
                p.workspace_bytes);
  FP8KERN_CHECK(Gemm::can_implement(args) == cutlass::Status::kSuccess, "grouped_blockwise_sm90: CUTLASS cannot run "
                "N=", p.n, " K=", p.k, " with ", p.groups, " groups");
  const int threads = 128;
  grouped_block_prep<Self><<<unsigned((p.groups + threads - 1) / threads), threads, 0, p.stream>>>(p, arr);
  FP8KERN_CUDA_CHECK(cudaGetLastError());
  Gemm gemm;
  FP8KERN_CUTLASS_CHECK(gemm.initialize(args, arr.cutlass_workspace, p.stream));
  FP8KERN_CUTLASS_CHECK(gemm.run(p.stream));
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fp8kern::sm90

#define FP8KERN_SM90_GROUPED_INSTANTIATE(ElementD, NAME)                                                   \
  namespace fp8kern::sm90 {                                                                                \
  void NAME(const GroupedBlockGemmProblem& p) { GroupedBlockMm<ElementD>::run(p); }                        \
  size_t NAME##_workspace(const GroupedBlockGemmProblem& p) { return GroupedBlockMm<ElementD>::workspace_size(p); } \
  }
