// CUDA kernels for the expert-grouped LoRA op: host-side launchers. No torch here: the
// ops layer (csrc/ops/grouped_lora_cuda.cpp) checks arguments, allocates, and calls these.
//
// Dimension legend:
//   T    tokens in the call            E    experts
//   r    LoRA rank (padded, shared)    in / out   feature sizes of the base linear
//   p    sorted position: a token's place after the plan's stable sort by expert
//
// A call runs two phases, as on CPU:
//   shrink:  V[t, :] = x[t, :] @ A[e]^T                          V: [T, r]
//   expand:  y[t, :] = (y[t, :] or 0) + s_e * V[t, :] @ B[e]^T
// through one of two kernels (tiling.h has the constants, use_segment_path the choice):
//   segment (SGMV)  tokens sorted by expert by a device plan; windows of sorted tokens, one
//                   tile GEMM per expert in the window: tensor cores (wmma) for float16 /
//                   bfloat16, FMA for float32 / float64. V is kept in sorted order.
//   gather  (BGMV)  no plan: windows of a few consecutive tokens, split into runs of one
//                   expert; a run streams its expert's A and B rows once, with 16-byte loads
//                   and warp reductions.
// Neither syncs with the host, so calls can be captured in a CUDA graph and replayed with
// new expert_ids.
// The weight gradients run the segment kernel with the tokens as the reduction dimension:
//   dW[e] = s_e * L_e^T R_e    (dA: L = U = g B, R = x;   dB: L = g, R = V).
//
// Numerics (the op's contract): V is rounded to the input dtype; every dot product
// accumulates in float (double for float64); each output element is rounded once.
// Results are deterministic: no atomics, fixed summation orders.
//
// Rows whose key is 0 (expert id -1, or an id outside [0, E), which the kernels treat the
// same way so that bad ids never index out of bounds) are skipped, or zeroed in y when
// `accumulate` is false. Callers validate everything else.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moa::cuda {

enum class Dtype : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

int64_t element_bytes(Dtype dtype);
// The accumulation type's size: 8 for float64, else 4 (float).
int64_t acc_bytes(Dtype dtype);

// The device plan: tokens stably sorted by key = expert + 1 (0 for no expert).
struct Plan {
  int64_t tokens = 0;                    // T
  int64_t experts = 0;                   // E
  const int32_t* perm = nullptr;         // [T]: token at sorted position p
  const int32_t* sorted_keys = nullptr;  // [T]: key at sorted position p, ascending
  const int32_t* seg_begin = nullptr;    // [E + 2]: first position of key k; [E + 1] = T
};

// Device workspace for make_plan (also the radix sort's scratch). T < 2^31, E < 2^31 - 1.
size_t plan_workspace_bytes(int64_t T, int64_t E);
// ids: [T] int32 or int64 (ids_int64), contiguous, on the device.
cudaError_t make_plan(const void* ids, bool ids_int64, int64_t T, int64_t E, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream, Plan* plan);

// A row-major operand with unit column stride: row p is data + row(p) * ld, with
// row(p) = perm[p] when gathered (token order), else p (sorted order).
struct Rows {
  const void* data = nullptr;
  int64_t ld = 0;
  bool gathered = false;
};

// Which kernel a forward call takes (see tiling.h).
bool use_segment_path(int64_t T, int64_t E, int64_t r);

// expert_ids as the gather kernels read them: [T] int32 or int64, contiguous, on the device.
struct Ids {
  const void* data = nullptr;
  bool int64 = false;
  int64_t tokens = 0;   // T
  int64_t experts = 0;  // E
};

// Segment shrink: v_sorted[p, :r] = x[perm[p], :in] @ A[e]^T.  A: [E, r, in] contiguous;
// v_sorted: [T, r] contiguous.
cudaError_t segment_shrink(Dtype dtype, const Plan& plan, Rows x, const void* A, int64_t in, int64_t r, void* v_sorted,
                           cudaStream_t stream);
// Segment expand: y[t, :out] = (accumulate ? y[t] : 0) + s_e * v[p, :r] @ B[e]^T.
// v: rows of V (sorted order, or gathered); B: [E, out, r] contiguous; y: row stride ldy.
cudaError_t segment_expand(Dtype dtype, const Plan& plan, Rows v, const void* B, const float* scales, int64_t out,
                           int64_t r, void* y, int64_t ldy, bool accumulate, cudaStream_t stream);

// Gather shrink: partials[s, t, :r] = x[t, slice s of in] @ A[e, :, slice s]^T, in the
// accumulation type; gather_splits(in) slices. partials: [splits, T, r] contiguous.
int64_t gather_splits(int64_t in);
cudaError_t gather_shrink(Dtype dtype, const Ids& ids, const void* x, int64_t ldx, const void* A, int64_t in, int64_t r,
                          void* partials, cudaStream_t stream);
// Gather expand: V[t] = round(sum_s partials[s, t]); then as segment_expand. r <= kGatherMaxRank.
cudaError_t gather_expand(Dtype dtype, const Ids& ids, const void* partials, int64_t splits, const void* B,
                          const float* scales, int64_t out, int64_t r, void* y, int64_t ldy, bool accumulate,
                          cudaStream_t stream);

// Weight gradient: dW[e, :M, :N] = s_e * sum_{p in segment e} L[row(p), :M]^T R[row(p), :N].
// dW: [E, M, N] contiguous, every element written (zero for experts without tokens).
// With splits > 1, workspace holds [splits, E, M, N] partial sums in the accumulation type.
int64_t weight_grad_splits(Dtype dtype, int64_t T, int64_t E, int64_t M, int64_t N);
cudaError_t segment_weight_grad(Dtype dtype, const Plan& plan, Rows L, Rows R, int64_t M, int64_t N,
                                const float* scales, void* dW, void* workspace, int64_t splits, cudaStream_t stream);

// The largest grid dimensions the launchers accept (CUDA's y / z limit), for the ops layer's
// error messages.
inline constexpr int64_t kMaxGridYZ = 65535;

}  // namespace moa::cuda
