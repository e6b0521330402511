// CPU kernels for the expert-grouped LoRA op.
//
// Dimension legend (used in every comment below):
//   T    tokens in the call            E    experts
//   r    LoRA rank (padded, shared)    in / out   feature sizes of the base linear
//
// A call is split into a Plan once, then run as two phases:
//   shrink:     V[t, :] = x[t, :] @ A[e_t]^T                      V: [T, r]
//   expand_add: y[t, :] += scales[e_t] * V[t, :] @ B[e_t]^T       y: [T, out]
// and, for training, the per-expert weight gradient
//   weight_grad: dW[e] += scales[e] * sum_{t: e_t = e} L[t, :]^T R[t, :]
//
// Tokens travel one of three paths (see make_plan):
//   runs          >= min_run consecutive tokens of one expert (packed sequences):
//                 BLAS GEMMs (ATen: MKL, oneDNN) directly on row views, no copies;
//   gemm groups   an expert's other tokens, when there are >= min_gemm_group of them:
//                 gathered into scratch, then BLAS GEMMs;
//   small groups  the rest (decode: one or a few tokens per expert): a SIMD kernel
//                 that reads each used expert's A and B once and the tokens' rows in
//                 place, parallel over experts, chunks of tokens and slices of r / out.
// plan_options<T>() picks the thresholds for the dtype and the CPU: with the AVX-512 or AVX2
// kernels, scattered tokens of any count take the SIMD path (no gather), unless the CPU
// multiplies T natively (AMX / AVX512-BF16 / AVX512-FP16), where GEMMs win.
// Environment overrides, read once per process (tuning and tests):
//   MOA_ENGINE_CPU_ISA=L         the kernel level (portable, avx2, avx512; cpu_isa() in
//                                decode_avx2.h), also of attention and the elementwise kernels
//   MOA_ENGINE_CPU_MIN_RUN=N     min_run
//   MOA_ENGINE_CPU_MIN_GATHER=N  min_gemm_group
// Tokens with expert id -1 are on no path: their rows of V are not written and their
// rows of y are left as they are.
//
// Numerics: V is rounded to the storage type (as two chained matmuls in that type
// would); every dot product accumulates in float (double for double), and each
// element of y is rounded once.
//
// This layer holds arithmetic only: callers validate arguments (ids in [-1, E),
// shapes, dtypes) before calling.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace moa::cpu {

struct PlanOptions {
  int64_t min_run = 16;            // shortest run of one expert handled by GEMMs on views
  int64_t min_gemm_group = 16;     // fewest scattered tokens of one expert worth gathering
  int64_t small_group_chunk = 64;  // most tokens in one small-group work item
};

struct Plan {
  struct Run {
    int64_t expert, begin, len;  // tokens [begin, begin + len)
  };
  struct Group {
    int64_t expert, offset, count;  // tokens perm[offset, offset + count)
  };
  std::vector<Run> runs;
  std::vector<Group> gemm_groups;
  std::vector<Group> small_groups;
  std::vector<int64_t> perm;  // scattered tokens, grouped by expert, ascending within one
};

// Whether this CPU multiplies T natively (AMX, AVX512-BF16 / -FP16): then BLAS GEMMs
// beat the FMA kernels. Always false for float and double.
template <typename T>
bool native_matmul();

// Thresholds for the dtype on this CPU (see the legend above).
template <typename scalar_t>
PlanOptions plan_options();

// ids: [T], each in [-1, E) (unchecked here).
template <typename Id>
Plan make_plan(const Id* ids, int64_t T, int64_t E, const PlanOptions& options = {});

// x: [T, in] with row stride ldx; A: [E, r, in] contiguous; V: [T, r] contiguous.
template <typename scalar_t>
void shrink(const Plan& plan, const scalar_t* x, int64_t ldx, const scalar_t* A, scalar_t* V, int64_t in, int64_t r);

// V: [T, r] contiguous; B: [E, out, r] contiguous; scales: [E]; y: [T, out], row stride ldy.
template <typename scalar_t>
void expand_add(const Plan& plan, const scalar_t* V, const scalar_t* B, const float* scales, scalar_t* y, int64_t ldy,
                int64_t out, int64_t r);

// L: [T, m] (row stride ldl); R: [T, n] (row stride ldr); dW: [E, m, n] contiguous and
// zero-initialised by the caller. dW[e] += scales[e] * L_e^T R_e, one GEMM per expert
// with tokens (on views when its tokens are one run, else on gathered rows).
template <typename scalar_t>
void weight_grad(const Plan& plan, const scalar_t* L, int64_t ldl, const scalar_t* R, int64_t ldr, const float* scales,
                 scalar_t* dW, int64_t m, int64_t n);

}  // namespace moa::cpu
