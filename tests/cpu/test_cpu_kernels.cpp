// C++ test of the CPU kernel family without Python or torch, for every instruction set this CPU runs: the exact
// e4m3 conversion of all 256 codes, scaled_mm in every layout and output type on odd shapes against a float64
// product of the same operands, at 1 and 3 threads (the results must be bit-identical), the scale value check, the
// AVX-512 epilogue against the portable one (bit-identical), and linear() against quantize() then scaled_mm()
// (bit-identical: the same steps). Built and run by tests/test_cpu_family.py (native) and, cross-compiled for
// aarch64 and run under qemu, by .ci/run.
//
// Bound: every product of two e4m3 values is exact in fp32 and every path sums them in fp32 in some order; a term
// passes through at most k - 1 additions plus, with block scales, the scale product (one rounding) and its
// multiply-add (one), and the epilogue's scale product, multiply and bias addition (three). So
// |D - exact| <= gamma_{k+6} * S + u_out * |exact|, S = sum |a_k b_k scale| (+ |bias|), gamma_n = n u / (1 - n u),
// u = 2^-24, u_out the output type's unit roundoff (2^-8 bf16, 2^-11 fp16, 2^-24 fp32).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fp8kern/cpu.h"
#ifdef FP8KERN_CPU_AVX512
#include "../../csrc/cpu/kernels.h"  // internal: the portable and the AVX-512 epilogue, compared below
#endif

using fp8kern::cpu::GemmProblem;
using fp8kern::cpu::LinearProblem;
using fp8kern::cpu::OutType;
using fp8kern::cpu::QuantKind;
using fp8kern::cpu::QuantProblem;

namespace {

int passed = 0, failed = 0;

void expect(bool ok, const char* what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what);
  }
}

double e4m3_value(uint8_t x) {  // from the format's definition, in double
  const int e = (x >> 3) & 15, m = x & 7;
  if (e == 15 && m == 7) return NAN;
  const double v = e == 0 ? m * std::ldexp(1.0, -9) : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
  return (x & 0x80) ? -v : v;
}

float out_value(const std::vector<uint16_t>& d16, const std::vector<float>& d32, OutType t, size_t i) {
  if (t == OutType::kFloat32) return d32[i];
  uint16_t h = d16[i];
  if (t == OutType::kBFloat16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  const int e = (h >> 10) & 31, m = h & 0x3ff;
  const double v = e == 0 ? m * std::ldexp(1.0, -24) : e == 31 ? (m ? NAN : INFINITY)
                                                             : (1.0 + m / 1024.0) * std::ldexp(1.0, e - 15);
  return float((h & 0x8000) ? -v : v);
}

uint8_t random_e4m3(std::mt19937& g) {
  for (;;) {
    const uint8_t x = uint8_t(g() & 0xff);
    if ((x & 0x7f) != 0x7f) return x;
  }
}

// One problem on the current instruction set; returns the raw output bytes (to compare thread counts).
std::vector<uint8_t> check(int64_t m, int64_t n, int64_t k, bool block, bool vec_a, bool vec_b, OutType t,
                           bool bias, int threads, unsigned seed) {
  std::mt19937 g(seed);
  const int64_t lda = k + 3, ldb = k + 5, ldd = n + 2, kb = (k + 127) / 128, nb = (n + 127) / 128;
  std::vector<uint8_t> a(size_t(m * lda)), b(size_t(n * ldb));
  for (auto& x : a) x = random_e4m3(g);
  for (auto& x : b) x = random_e4m3(g);
  std::uniform_real_distribution<float> us(0.25f, 4.0f);
  // (At k = 0 a block-scaled problem reads no scales; one element keeps the pointers non-null.)
  std::vector<float> sa(block ? size_t(std::max<int64_t>(1, m * kb)) : vec_a ? size_t(m) : 1),
      sb(block ? size_t(std::max<int64_t>(1, nb * kb)) : vec_b ? size_t(n) : 1);
  for (auto& s : sa) s = us(g) / 64;
  for (auto& s : sb) s = us(g) / 64;
  std::vector<float> biasf(static_cast<size_t>(n));
  std::vector<uint16_t> bias16(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    biasf[size_t(i)] = float(int(g() % 200) - 100) / 8;  // exact in every output type
    const float f = biasf[size_t(i)];
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bias16[size_t(i)] = t == OutType::kBFloat16 ? uint16_t(u >> 16) : 0;
    if (t == OutType::kFloat16) {  // |f| < 16, a multiple of 1/8: a normal fp16 (or zero)
      const double af = std::fabs(f);
      if (af == 0) {
        bias16[size_t(i)] = 0;
      } else {
        int e;
        const double fr = std::frexp(af, &e);  // af = fr 2^e, fr in [0.5, 1)
        bias16[size_t(i)] = uint16_t((f < 0 ? 0x8000 : 0) | ((e - 1 + 15) << 10) | int((fr * 2 - 1) * 1024));
      }
    }
  }
  std::vector<float> d32(size_t(m * ldd), NAN);
  std::vector<uint16_t> d16(size_t(m * ldd), 0x7e00);
  GemmProblem p;
  p.a = a.data();
  p.b = b.data();
  p.d = t == OutType::kFloat32 ? static_cast<void*>(d32.data()) : static_cast<void*>(d16.data());
  p.m = m, p.n = n, p.k = k, p.lda = lda, p.ldb = ldb, p.ldd = ldd;
  p.d_type = t;
  p.bias = !bias ? nullptr : t == OutType::kFloat32 ? static_cast<const void*>(biasf.data())
                                                    : static_cast<const void*>(bias16.data());
  p.scale_a = sa.data(), p.scale_b = sb.data();
  p.block = block, p.scale_a_vector = vec_a, p.scale_b_vector = vec_b;
  p.lds_a = kb, p.lds_b = kb;
  p.threads = threads;
  fp8kern::cpu::scaled_mm(p);

  const double u = std::ldexp(1.0, -24), uo = t == OutType::kFloat32 ? u : t == OutType::kFloat16
                                                                              ? std::ldexp(1.0, -11)
                                                                              : std::ldexp(1.0, -8);
  const double gamma = (k + 6) * u / (1 - (k + 6) * u);
  bool ok = true;
  for (int64_t i = 0; i < m && ok; ++i) {
    for (int64_t j = 0; j < n && ok; ++j) {
      double exact = 0, S = 0;
      for (int64_t x = 0; x < k; ++x) {
        const double s = block ? double(sa[size_t(i * kb + x / 128)]) * sb[size_t((j / 128) * kb + x / 128)]
                               : double(sa[vec_a ? size_t(i) : 0]) * sb[vec_b ? size_t(j) : 0];
        const double prod = e4m3_value(a[size_t(i * lda + x)]) * e4m3_value(b[size_t(j * ldb + x)]) * s;
        exact += prod;
        S += std::fabs(prod);
      }
      if (bias) exact += biasf[size_t(j)], S += std::fabs(biasf[size_t(j)]);
      const double got = out_value(d16, d32, t, size_t(i * ldd + j));
      const double lim = gamma * S + uo * std::fabs(exact) + 1e-40;
      if (!(std::fabs(got - exact) <= lim)) {
        std::printf("  %s m=%lld n=%lld k=%lld block=%d out=%d: D[%lld,%lld]=%.9g, exact %.9g, bound %.3g\n",
                    fp8kern::cpu::isa(), (long long)m, (long long)n, (long long)k, block, int(t), (long long)i,
                    (long long)j, got, exact, lim);
        ok = false;
      }
    }
    for (int64_t j = n; j < ldd; ++j)  // the padding between rows is never written
      ok = ok && (t == OutType::kFloat32 ? std::isnan(d32[size_t(i * ldd + j)]) : d16[size_t(i * ldd + j)] == 0x7e00);
  }
  expect(ok, "scaled_mm within its bound, padding untouched");
  std::vector<uint8_t> raw(t == OutType::kFloat32 ? d32.size() * 4 : d16.size() * 2);
  std::memcpy(raw.data(), t == OutType::kFloat32 ? static_cast<void*>(d32.data()) : static_cast<void*>(d16.data()),
              raw.size());
  return raw;
}

// The conversion of every code: a 1 x 1 x 1 GEMM with scales 1, fp32 out, gives the value itself (exact: one
// exact product). Its sign of zero is the sum's: fp32 accumulators start at +0 and +0 + -0 = +0, so code 0x80 (-0)
// comes out +0, as from any fp32 GEMM; every other code, NaN included, must come out as itself.
void conversion_all_codes() {
  int bad = 0;
  for (int x = 0; x < 256; ++x) {
    const uint8_t a = uint8_t(x), one = 0x38;  // 0x38 = 1.0
    float d = 0, s = 1;
    GemmProblem p;
    p.a = &a, p.b = &one, p.d = &d, p.m = p.n = p.k = 1, p.lda = p.ldb = p.ldd = 1;
    p.d_type = OutType::kFloat32, p.scale_a = &s, p.scale_b = &s;
    fp8kern::cpu::scaled_mm(p);
    const double want = e4m3_value(a);
    const bool same = std::isnan(want) ? std::isnan(d) : (d == want && (want == 0 || std::signbit(d) == std::signbit(want)));
    if (!same && bad++ < 4) std::printf("  %s: code 0x%02x -> %.9g, want %.9g\n", fp8kern::cpu::isa(), x, d, want);
  }
  expect(bad == 0, "e4m3 conversion of all 256 codes");
}

}  // namespace

// linear() must equal quantize() into caller buffers followed by scaled_mm() on them, bit for bit, for every kind.
void linear_matches_quantize_then_gemm() {
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  const int64_t m = 5, n = 131, k = 300, kb = (k + 127) / 128, nb = (n + 127) / 128;
  std::vector<float> x(size_t(m * k));
  for (auto& v : x) v = nd(g);
  std::vector<uint8_t> w(size_t(n * k));
  for (auto& v : w) v = random_e4m3(g);
  std::vector<float> ws_vec(size_t(n), 0.03f), ws_blk(size_t(nb * kb), 0.02f);
  const float static_scale = 0.05f;
  struct Case { QuantKind kind; bool e8m0; };
  for (Case c : {Case{QuantKind::kToken, false}, Case{QuantKind::kTensor, false}, Case{QuantKind::kGroup, false},
                 Case{QuantKind::kGroup, true}, Case{QuantKind::kStatic, false}}) {
    const bool block = c.kind == QuantKind::kGroup;
    GemmProblem gp;
    gp.b = w.data(), gp.m = m, gp.n = n, gp.k = k, gp.ldb = k, gp.ldd = n, gp.d_type = OutType::kFloat32;
    gp.scale_b = block ? ws_blk.data() : ws_vec.data(), gp.scale_b_vector = !block, gp.block = block;
    gp.lds_b = kb, gp.threads = 2;
    QuantProblem qp;
    qp.kind = c.kind, qp.x = x.data(), qp.x_type = OutType::kFloat32, qp.m = m, qp.k = k, qp.x_rs = k;
    qp.scale_e8m0 = c.e8m0, qp.group = 128, qp.threads = 2;
    // the two calls, by hand
    std::vector<uint8_t> q(size_t(m * k)), s8(size_t(m * kb));
    std::vector<float> s(size_t(m * kb));
    QuantProblem q1 = qp;
    q1.q = q.data(), q1.q_rs = k;
    if (c.kind == QuantKind::kStatic) {
      q1.scale = const_cast<float*>(&static_scale), q1.s_rs = q1.s_cs = 0, q1.group = k;
    } else {
      q1.scale = c.e8m0 ? static_cast<void*>(s8.data()) : static_cast<void*>(s.data());
      q1.s_rs = block ? kb : 1, q1.s_cs = 1;
    }
    fp8kern::cpu::quantize(q1);
    if (c.e8m0)
      for (size_t i = 0; i < s.size(); ++i) s[i] = std::ldexp(1.0f, int(s8[i]) - 127);
    GemmProblem g1 = gp;
    std::vector<float> d1(size_t(m * n)), d2(size_t(m * n), NAN);
    g1.a = q.data(), g1.lda = k, g1.d = d1.data(), g1.lds_a = kb;
    g1.scale_a = c.kind == QuantKind::kStatic ? &static_scale : s.data();
    g1.scale_a_vector = c.kind == QuantKind::kToken;
    fp8kern::cpu::scaled_mm(g1);
    // one call
    LinearProblem lp;
    lp.quant = qp, lp.gemm = gp;
    lp.gemm.d = d2.data();
    if (c.kind == QuantKind::kStatic) lp.quant.scale = const_cast<float*>(&static_scale);
    fp8kern::cpu::linear(lp);
    expect(std::memcmp(d1.data(), d2.data(), d1.size() * sizeof(float)) == 0, "linear == quantize then scaled_mm");
  }
  LinearProblem bad;
  bad.quant.m = bad.gemm.m = 2, bad.quant.k = bad.gemm.k = 64, bad.quant.kind = QuantKind::kGroup;
  bad.quant.group = 64, bad.gemm.block = true;
  bool refused = false;
  try {
    fp8kern::cpu::validate_linear(bad);
  } catch (const fp8kern::cpu::InvalidArgument&) {
    refused = true;
  }
  expect(refused, "linear refuses groups of other than 128 columns");
}

// bad_scales names the first scale tensor holding a value that is not finite and > 0, among the values read.
void scale_value_check() {
  std::vector<float> sa(4, 1.0f), sb(6, 1.0f);
  GemmProblem p;
  p.m = 4, p.n = 6, p.k = 8, p.scale_a = sa.data(), p.scale_b = sb.data();
  p.scale_a_vector = p.scale_b_vector = true;
  expect(fp8kern::cpu::bad_scales(p) == 0, "good scales pass");
  sb[5] = NAN;
  expect(fp8kern::cpu::bad_scales(p) == 2, "a NaN in scale_b is found");
  p.scale_b_vector = false;
  expect(fp8kern::cpu::bad_scales(p) == 0, "a per-tensor scale_b reads only its first value");
  sa[3] = 0.0f;
  expect(fp8kern::cpu::bad_scales(p) == 1, "a zero in scale_a is found first");
  sa[3] = -INFINITY;
  expect(fp8kern::cpu::bad_scales(p) == 1, "-inf in scale_a is found");
  sa[3] = INFINITY;
  expect(fp8kern::cpu::bad_scales(p) == 1, "inf in scale_a is found");
}

// The AVX-512 epilogue writes the portable one's bits: fp32 sums of every kind (random bit patterns: normals,
// subnormals, zeros, infinities, NaNs, signalling NaNs that pass the block-scaled epilogue unchanged; and values
// halfway between two bf16), per-row and per-tensor scale_a,
// block-scaled, with and without bias, every output type, a tile width not a multiple of 16, a row stride.
void epilogues_agree() {
#ifdef FP8KERN_CPU_AVX512
  if (!fp8kern::cpu::isa_supported("avx512")) return;
  std::mt19937 rng(7);
  const int m = 5, nt = 45, n0 = 3, ldd = 53;
  std::vector<float> c(m * nt), sa(m), sb(nt), bias(nt);
  for (size_t i = 0; i < c.size(); ++i) {
    uint32_t u = rng();
    if (i % 3 == 0) u = (u & 0xffff0000u) | 0x8000u;  // a tie: exactly halfway between two bf16 values
    if (i % 7 == 0) u &= 0x807fffffu;                  // a subnormal or zero
    if (i % 11 == 0) u = (u & 0x80000000u) | 0x7f800001u | (u & 0x3fffu);  // a NaN whose top 16 bits read as inf
    std::memcpy(&c[i], &u, 4);
  }
  std::uniform_real_distribution<float> scale(-10.0f, 10.0f), value(-100.0f, 100.0f);
  for (float& v : sa) v = std::ldexp(1.3f, int(scale(rng)));
  for (float& v : sb) v = std::ldexp(1.7f, int(scale(rng)));
  for (float& v : bias) v = value(rng);
  for (OutType t : {OutType::kBFloat16, OutType::kFloat16, OutType::kFloat32})
    for (int mode = 0; mode < 3; ++mode)  // per-row scale_a, per-tensor scale_a, block-scaled
      for (bool with_bias : {false, true}) {
        std::vector<uint32_t> d1(m * ldd, 0xdeadbeefu), d2(m * ldd, 0xdeadbeefu);
        GemmProblem p;
        p.m = m, p.n = n0 + nt, p.ldd = ldd, p.d_type = t, p.scale_a = sa.data(), p.scale_a_vector = mode == 0;
        p.block = mode == 2, p.bias = with_bias ? bias.data() : nullptr;
        p.d = d1.data();
        fp8kern::cpu::epilogue_rows(p, n0, nt, c.data(), sb.data(), bias.data());
        p.d = d2.data();
        fp8kern::cpu::epilogue_rows_avx512(p, n0, nt, c.data(), sb.data(), bias.data());
        expect(d1 == d2, "the AVX-512 epilogue writes the portable epilogue's bits, and nothing else");
      }
#endif
}

int main() {
  const char* isas[] = {"amx", "avx512", "avx2", "generic"};
  for (const char* name : isas) {
    if (!fp8kern::cpu::isa_supported(name)) {
      std::printf("%s: not supported on this CPU, skipped\n", name);
      continue;
    }
    fp8kern::cpu::set_isa(name);
    std::printf("%s\n", fp8kern::cpu::isa());
    conversion_all_codes();
    linear_matches_quantize_then_gemm();
    unsigned seed = 1;
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 37, 200}, {3, 130, 129}, {4, 260, 256}, {5, 9, 64},
                                 {17, 131, 300}, {129, 33, 70}, {2, 300, 1000}, {40, 70, 520},
                                 {40, 20, 0},   {5, 9, 0}};
    for (const auto& s : shapes) {
      for (int layout = 0; layout < 3; ++layout) {
        for (OutType t : {OutType::kBFloat16, OutType::kFloat16, OutType::kFloat32}) {
          const bool block = layout == 2, vec = layout == 1, bias = (seed % 2) == 0;
          const auto one = check(s[0], s[1], s[2], block, vec, vec && seed % 3, t, bias, 1, seed);
          const auto three = check(s[0], s[1], s[2], block, vec, vec && seed % 3, t, bias, 3, seed);
          expect(one == three, "identical results at 1 and 3 threads");
          ++seed;
        }
      }
    }
  }
  scale_value_check();
  epilogues_agree();
  bool refused = false;
  try {
    fp8kern::cpu::set_isa("no-such-isa");
  } catch (const fp8kern::cpu::InvalidArgument&) {
    refused = true;
  }
  expect(refused, "an unknown instruction set is refused");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
