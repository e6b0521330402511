// CPU kernels for the expert-grouped LoRA op: planning, BLAS GEMMs for grouped
// tokens, and a SIMD kernel for decode-shaped calls. See grouped_lora_cpu.h for
// the dimension legend and the three paths.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no Python, no model knowledge;
// CPU kernels may use ATen's BLAS and at::parallel_for.
#include "kernels/cpu/grouped_lora_cpu.h"

#include "kernels/cpu/decode_avx2.h"
#include "kernels/cpu/decode_avx512.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

// The SIMD loops are compiled for several x86 levels and picked at load time, so
// one build runs everywhere and still uses AVX-512 / AVX2+F16C where present.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MOA_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MOA_HAVE_FLOAT16 1
#else
#define MOA_TARGET_CLONES
#define MOA_HAVE_FLOAT16 0
#endif
#define MOA_INLINE inline __attribute__((always_inline))

namespace moa::cpu {
namespace {

// ---------------------------------------------------------------------------
// Element conversions. Accumulation is in float (double for double).

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

MOA_INLINE float to_acc(float v) { return v; }
MOA_INLINE double to_acc(double v) { return v; }
MOA_INLINE float to_acc(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
MOA_INLINE float to_acc(c10::Half v) {
#if MOA_HAVE_FLOAT16
  return static_cast<float>(__builtin_bit_cast(_Float16, v.x));
#else
  return static_cast<float>(v);
#endif
}

template <typename T>
MOA_INLINE T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    // Round to nearest even; NaN stays NaN.
    const uint32_t rounded = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if MOA_HAVE_FLOAT16
    return c10::Half(__builtin_bit_cast(uint16_t, static_cast<_Float16>(v)), c10::Half::from_bits());
#else
    return c10::Half(v);
#endif
  } else {
    return static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------
// BLAS through ATen (MKL for float, oneDNN for bfloat16 / float16) on row-major
// views of raw buffers. op(A) is [M, K] (A itself, or A^T when trans_a), op(B) is
// [K, N]; lda / ldb / ldc are row strides.

template <typename T>
at::Tensor view2d(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {std::max<int64_t>(ld, 1), 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
at::Tensor op_view(bool trans, const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return trans ? view2d(data, cols, rows, ld).t() : view2d(data, rows, cols, ld);
}

// C = op(A) @ op(B); C is not read.
template <typename T>
void gemm_set(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
              int64_t ldb, T* C, int64_t ldc) {
  at::Tensor c = view2d(C, M, N, ldc);
  at::mm_out(c, op_view(trans_a, A, M, K, lda), op_view(trans_b, B, K, N, ldb));
}

// C += alpha * op(A) @ op(B), accumulated in float and rounded once into C.
template <typename T>
void gemm_add(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
              const T* B, int64_t ldb, T* C, int64_t ldc) {
  view2d(C, M, N, ldc)
      .addmm_(op_view(trans_a, A, M, K, lda), op_view(trans_b, B, K, N, ldb),
              /*beta=*/1, /*alpha=*/alpha);
}

// Copies rows[i] of src (row stride ld) into row i of dst [count, width].
template <typename T>
void gather_rows(const T* src, int64_t ld, const int64_t* rows, int64_t count, int64_t width, T* dst) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, width * sizeof(T)));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * width, src + rows[i] * ld, width * sizeof(T));
    }
  });
}

// Copies row i of src [count, width] into rows[i] of dst (row stride ld).
template <typename T>
void scatter_rows(const T* src, int64_t count, int64_t width, const int64_t* rows, T* dst, int64_t ld) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, width * sizeof(T)));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + rows[i] * ld, src + i * width, width * sizeof(T));
    }
  });
}

// A tuning knob from the environment (read once per process), or `fallback` when unset
// or empty. A bad value is a ValueError naming the variable, the value and what is expected
// (as MOA_ENGINE_SMALL_M in engine/linear.cpp and MOA_ENGINE_CUDA_PATH in ops/).
int64_t env_int(const char* name, int64_t fallback, int64_t min_value = 1) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && errno != ERANGE && parsed >= min_value, name,
                    " must be an integer >= ", min_value, ", got '", value, "'");
  return parsed;
}

// ---------------------------------------------------------------------------
// SIMD kernel for small groups (decode). Work items are (group, slice of rows of
// the expert's weight); each item reads its slice once per block of 4 tokens.

template <typename T>
struct SmallArgs {
  const Plan* plan;
  const T* src;  // shrink: x [T, in]      expand: V [T, r]
  int64_t ld_src;
  const T* weight;  // shrink: A [E, r, in]   expand: B [E, out, r]
  T* dst;           // shrink: V [T, r]       expand: y [T, out]
  int64_t ld_dst;
  int64_t rows;                   // weight rows per expert: r (shrink) or out (expand)
  int64_t k;                      // dot length: in (shrink) or r (expand)
  const float* scales;            // expand only
  int64_t slice;                  // weight rows per item
  int64_t splits;                 // items per group
  CpuIsa isa = CpuIsa::portable;  // avx512 / avx2: the kernels of decode_avx512.h / decode_avx2.h
};

// out[q] = dot(w, xs[q]) for q < NT; w and xs[q] have k elements.
template <int NT, typename T>
MOA_INLINE void dot_block(const T* __restrict w, const T* const* xs, int64_t k, acc_t<T>* out) {
  const T* x0 = xs[0];
  const T* x1 = xs[NT > 1 ? 1 : 0];
  const T* x2 = xs[NT > 2 ? 2 : 0];
  const T* x3 = xs[NT > 3 ? 3 : 0];
  acc_t<T> s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < k; ++i) {
    const acc_t<T> wv = to_acc(w[i]);
    s0 += wv * to_acc(x0[i]);
    if constexpr (NT > 1) s1 += wv * to_acc(x1[i]);
    if constexpr (NT > 2) s2 += wv * to_acc(x2[i]);
    if constexpr (NT > 3) s3 += wv * to_acc(x3[i]);
  }
  out[0] = s0;
  if constexpr (NT > 1) out[1] = s1;
  if constexpr (NT > 2) out[2] = s2;
  if constexpr (NT > 3) out[3] = s3;
}

template <typename T>
MOA_INLINE void dot_tokens(int nt, const T* w, const T* const* xs, int64_t k, acc_t<T>* out) {
  switch (nt) {
    case 1: dot_block<1>(w, xs, k, out); break;
    case 2: dot_block<2>(w, xs, k, out); break;
    case 3: dot_block<3>(w, xs, k, out); break;
    default: dot_block<4>(w, xs, k, out); break;
  }
}

// Runs items [begin, end). kExpand selects y += scale * dot (expand) over V = dot (shrink).
template <bool kExpand, typename T>
MOA_INLINE void small_items_impl(const SmallArgs<T>& a, int64_t begin, int64_t end) {
  const auto& groups = a.plan->small_groups;
  const int64_t* perm = a.plan->perm.data();
  for (int64_t item = begin; item < end; ++item) {
    const Plan::Group& g = groups[item / a.splits];
    const int64_t row0 = (item % a.splits) * a.slice;
    const int64_t row1 = std::min(a.rows, row0 + a.slice);
    const T* w_expert = a.weight + g.expert * a.rows * a.k;
    const acc_t<T> scale = kExpand ? static_cast<acc_t<T>>(a.scales[g.expert]) : acc_t<T>(1);
    for (int64_t i = 0; i < g.count; i += 4) {
      const int nt = static_cast<int>(std::min<int64_t>(4, g.count - i));
      const T* srcs[4];
      T* dsts[4];
      for (int q = 0; q < nt; ++q) {
        const int64_t tok = perm[g.offset + i + q];
        srcs[q] = a.src + tok * a.ld_src;
        dsts[q] = a.dst + tok * a.ld_dst;
      }
      if constexpr (!std::is_same_v<T, double>) {
        if (a.isa == CpuIsa::avx512) {
          if constexpr (kExpand) {
            expand_block_avx512(w_expert, a.k, row0, row1, srcs, dsts, nt, scale);
          } else {
            shrink_block_avx512(w_expert, a.k, row0, row1, srcs, dsts, nt);
          }
          continue;
        }
        if (a.isa == CpuIsa::avx2) {
          if constexpr (kExpand) {
            expand_block_avx2(w_expert, a.k, row0, row1, srcs, dsts, nt, scale);
          } else {
            shrink_block_avx2(w_expert, a.k, row0, row1, srcs, dsts, nt);
          }
          continue;
        }
      }
      acc_t<T> acc[4];
      for (int64_t row = row0; row < row1; ++row) {
        dot_tokens(nt, w_expert + row * a.k, srcs, a.k, acc);
        for (int q = 0; q < nt; ++q) {
          if constexpr (kExpand) {
            dsts[q][row] = from_acc<T>(to_acc(dsts[q][row]) + scale * acc[q]);
          } else {
            dsts[q][row] = from_acc<T>(acc[q]);
          }
        }
      }
    }
  }
}

#define MOA_DEFINE_SMALL_KERNELS(T, NAME)                                                   \
  MOA_TARGET_CLONES void shrink_items_##NAME(const SmallArgs<T>& a, int64_t b, int64_t e) { \
    small_items_impl<false>(a, b, e);                                                       \
  }                                                                                         \
  MOA_TARGET_CLONES void expand_items_##NAME(const SmallArgs<T>& a, int64_t b, int64_t e) { \
    small_items_impl<true>(a, b, e);                                                        \
  }
MOA_DEFINE_SMALL_KERNELS(double, f64)
MOA_DEFINE_SMALL_KERNELS(float, f32)
MOA_DEFINE_SMALL_KERNELS(c10::BFloat16, bf16)
MOA_DEFINE_SMALL_KERNELS(c10::Half, f16)
#undef MOA_DEFINE_SMALL_KERNELS

template <bool kExpand, typename T>
void small_items(const SmallArgs<T>& a, int64_t b, int64_t e) {
#define MOA_CALL(NAME) return kExpand ? expand_items_##NAME(a, b, e) : shrink_items_##NAME(a, b, e)
  if constexpr (std::is_same_v<T, double>)
    MOA_CALL(f64);
  else if constexpr (std::is_same_v<T, float>)
    MOA_CALL(f32);
  else if constexpr (std::is_same_v<T, c10::BFloat16>)
    MOA_CALL(bf16);
  else
    MOA_CALL(f16);
#undef MOA_CALL
}

// Splits each group's weight rows so that small calls (few experts) still use
// every thread, without making items smaller than ~16 KB of weights.
int64_t pick_splits(int64_t groups, int64_t rows, int64_t row_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = (4 * threads + groups - 1) / groups;
  const int64_t by_size = std::max<int64_t>(1, rows * row_bytes / (16 << 10));
  return std::clamp<int64_t>(wanted, 1, std::min(rows, by_size));
}

template <bool kExpand, typename T>
void run_small_groups(SmallArgs<T> a) {
  const int64_t groups = static_cast<int64_t>(a.plan->small_groups.size());
  if (groups == 0 || a.rows == 0) return;
  const int64_t splits = pick_splits(groups, a.rows, a.k * static_cast<int64_t>(sizeof(T)));
  const CpuIsa isa = cpu_isa();
  const int64_t max_rank = isa == CpuIsa::avx512 ? kDecodeAvx512MaxRank : kDecodeAvx2MaxRank;
  a.isa = !kExpand || a.k <= max_rank ? isa : CpuIsa::portable;
  a.slice = (a.rows + splits - 1) / splits;
  a.splits = (a.rows + a.slice - 1) / a.slice;
  at::parallel_for(0, groups * a.splits, 1, [&](int64_t begin, int64_t end) { small_items<kExpand>(a, begin, end); });
}

}  // namespace

// ---------------------------------------------------------------------------
// Planning: runs, then a counting sort of the remaining tokens by expert.

template <typename T>
bool native_matmul() {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return false;
  const auto caps = at::cpu::get_cpu_capabilities();  // cpuinfo's view of this CPU
  auto has = [&](const char* name) {
    const auto it = caps.find(name);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  if constexpr (std::is_same_v<T, c10::BFloat16>) return has("amx_bf16") || has("avx512_bf16");
  return has("amx_fp16") || has("avx512_fp16");
}

template bool native_matmul<float>();
template bool native_matmul<double>();
template bool native_matmul<c10::BFloat16>();
template bool native_matmul<c10::Half>();

template <typename scalar_t>
PlanOptions plan_options() {
  static const PlanOptions options = [] {
    PlanOptions o;
    const bool simd = cpu_isa() != CpuIsa::portable && !std::is_same_v<scalar_t, double>;
    if (simd && !native_matmul<scalar_t>()) o.min_gemm_group = std::numeric_limits<int64_t>::max();
    o.min_run = env_int("MOA_ENGINE_CPU_MIN_RUN", o.min_run);
    o.min_gemm_group = env_int("MOA_ENGINE_CPU_MIN_GATHER", o.min_gemm_group);
    return o;
  }();
  return options;
}

template PlanOptions plan_options<double>();
template PlanOptions plan_options<float>();
template PlanOptions plan_options<c10::BFloat16>();
template PlanOptions plan_options<c10::Half>();

template <typename Id>
Plan make_plan(const Id* ids, int64_t T, int64_t E, const PlanOptions& options) {
  Plan plan;
  std::vector<int64_t> count(E, 0);
  // Calls fn(expert, begin, len) for each maximal run of one expert id >= 0.
  auto for_each_run = [&](auto&& fn) {
    for (int64_t t = 0; t < T;) {
      const int64_t e = static_cast<int64_t>(ids[t]);
      int64_t end = t + 1;
      while (end < T && static_cast<int64_t>(ids[end]) == e) ++end;
      if (e >= 0) fn(e, t, end - t);
      t = end;
    }
  };
  for_each_run([&](int64_t e, int64_t begin, int64_t len) {
    if (len >= options.min_run) {
      plan.runs.push_back({e, begin, len});
    } else {
      count[e] += len;
    }
  });
  std::vector<int64_t> cursor(E, 0);
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    cursor[e] = total;
    if (count[e] == 0) continue;
    if (count[e] >= options.min_gemm_group) {
      plan.gemm_groups.push_back({e, total, count[e]});
    } else {  // in chunks, so a large group still spreads over the threads
      for (int64_t i = 0; i < count[e]; i += options.small_group_chunk) {
        plan.small_groups.push_back({e, total + i, std::min(options.small_group_chunk, count[e] - i)});
      }
    }
    total += count[e];
  }
  plan.perm.resize(total);
  if (total == 0) return plan;
  for_each_run([&](int64_t e, int64_t begin, int64_t len) {
    if (len >= options.min_run) return;
    for (int64_t t = begin; t < begin + len; ++t) plan.perm[cursor[e]++] = t;
  });
  return plan;
}

template Plan make_plan<int32_t>(const int32_t*, int64_t, int64_t, const PlanOptions&);
template Plan make_plan<int64_t>(const int64_t*, int64_t, int64_t, const PlanOptions&);

// ---------------------------------------------------------------------------

template <typename T>
void shrink(const Plan& plan, const T* x, int64_t ldx, const T* A, T* V, int64_t in, int64_t r) {
  for (const auto& run : plan.runs) {
    // V[run] = x[run] @ A[e]^T        [len, in] x [in, r]
    gemm_set(false, true, run.len, r, in, x + run.begin * ldx, ldx, A + run.expert * r * in, in, V + run.begin * r, r);
  }
  if (!plan.gemm_groups.empty()) {
    std::vector<T> xg, vg;
    for (const auto& g : plan.gemm_groups) {
      const int64_t* rows = plan.perm.data() + g.offset;
      xg.resize(g.count * in);
      vg.resize(g.count * r);
      gather_rows(x, ldx, rows, g.count, in, xg.data());
      gemm_set(false, true, g.count, r, in, xg.data(), in, A + g.expert * r * in, in, vg.data(), r);
      scatter_rows(vg.data(), g.count, r, rows, V, r);
    }
  }
  run_small_groups<false, T>({&plan, x, ldx, A, V, r, r, in, nullptr, 0, 0});
}

template <typename T>
void expand_add(const Plan& plan, const T* V, const T* B, const float* scales, T* y, int64_t ldy, int64_t out,
                int64_t r) {
  for (const auto& run : plan.runs) {
    // y[run] += s * V[run] @ B[e]^T   [len, r] x [r, out]
    gemm_add(false, true, run.len, out, r, scales[run.expert], V + run.begin * r, r, B + run.expert * out * r, r,
             y + run.begin * ldy, ldy);
  }
  if (!plan.gemm_groups.empty()) {
    // Gather the rows of y too, so each element is still rounded once (by the GEMM).
    std::vector<T> vg, yg;
    for (const auto& g : plan.gemm_groups) {
      const int64_t* rows = plan.perm.data() + g.offset;
      vg.resize(g.count * r);
      yg.resize(g.count * out);
      gather_rows(V, r, rows, g.count, r, vg.data());
      gather_rows(y, ldy, rows, g.count, out, yg.data());
      gemm_add(false, true, g.count, out, r, scales[g.expert], vg.data(), r, B + g.expert * out * r, r, yg.data(), out);
      scatter_rows(yg.data(), g.count, out, rows, y, ldy);
    }
  }
  run_small_groups<true, T>({&plan, V, r, B, y, ldy, out, r, scales, 0, 0});
}

template <typename T>
void weight_grad(const Plan& plan, const T* L, int64_t ldl, const T* R, int64_t ldr, const float* scales, T* dW,
                 int64_t m, int64_t n) {
  // Each expert's tokens: its runs, then its scattered tokens.
  std::vector<std::vector<int64_t>> tokens;  // per entry of `experts`
  std::vector<int64_t> experts, slot;
  auto tokens_of = [&](int64_t e) -> std::vector<int64_t>& {
    if (static_cast<int64_t>(slot.size()) <= e) slot.resize(e + 1, -1);
    if (slot[e] < 0) {
      slot[e] = static_cast<int64_t>(experts.size());
      experts.push_back(e);
      tokens.emplace_back();
    }
    return tokens[slot[e]];
  };
  for (const auto& run : plan.runs) {
    auto& list = tokens_of(run.expert);
    for (int64_t t = run.begin; t < run.begin + run.len; ++t) list.push_back(t);
  }
  for (const auto* groups : {&plan.gemm_groups, &plan.small_groups}) {
    for (const auto& g : *groups) {
      auto& list = tokens_of(g.expert);
      list.insert(list.end(), plan.perm.begin() + g.offset, plan.perm.begin() + g.offset + g.count);
    }
  }
  std::vector<T> lg, rg;
  for (size_t i = 0; i < experts.size(); ++i) {
    const int64_t e = experts[i];
    const auto& list = tokens[i];
    const int64_t count = static_cast<int64_t>(list.size());
    const T *l = L + list.front() * ldl, *rr = R + list.front() * ldr;
    int64_t ld_l = ldl, ld_r = ldr;
    if (list.back() - list.front() + 1 != count) {  // not one run: gather, one GEMM
      lg.resize(count * m);
      rg.resize(count * n);
      gather_rows(L, ldl, list.data(), count, m, lg.data());
      gather_rows(R, ldr, list.data(), count, n, rg.data());
      l = lg.data(), rr = rg.data(), ld_l = m, ld_r = n;
    }
    // dW[e] += s * L_e^T @ R_e      [m, count] x [count, n]
    gemm_add(true, false, m, n, count, scales[e], l, ld_l, rr, ld_r, dW + e * m * n, n);
  }
}

#define MOA_INSTANTIATE(T)                                                                                   \
  template void shrink<T>(const Plan&, const T*, int64_t, const T*, T*, int64_t, int64_t);                   \
  template void expand_add<T>(const Plan&, const T*, const T*, const float*, T*, int64_t, int64_t, int64_t); \
  template void weight_grad<T>(const Plan&, const T*, int64_t, const T*, int64_t, const float*, T*, int64_t, int64_t);
MOA_INSTANTIATE(double)
MOA_INSTANTIATE(float)
MOA_INSTANTIATE(c10::BFloat16)
MOA_INSTANTIATE(c10::Half)
#undef MOA_INSTANTIATE

}  // namespace moa::cpu
