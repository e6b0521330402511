// CPU kernels for the engine's transformer forward (the dense linears are in
// decode_avx512.h and BLAS). Arithmetic only: callers check shapes.
//
// Dimension legend: N tokens in the packed batch, H hidden size, D head dim,
// nh / nkv query / key-value heads, I intermediate size.
//
// Numerics follow transformers' Llama modules in the storage type T, so float32 and
// bfloat16 results match HF's to rounding: each step that HF rounds to T is rounded
// here too; reductions accumulate in float.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace moa::cpu {

// y[n] = T(w * T(x[n] * rsqrt(mean(x[n]^2) + eps))), rows of H.
template <typename T>
void rms_norm(const T* x, int64_t ldx, const T* w, T* y, int64_t ldy, int64_t rows, int64_t H, float eps);

// Rotary embedding in place on `heads` heads of D per row (rotate-half layout):
// for i < D/2, with c = T(cos[pos][i]), s = T(sin[pos][i]):
//   x[i]       = T(T(x[i] * c) - T(x[i + D/2] * s))
//   x[i + D/2] = T(T(x[i + D/2] * c) + T(x[i] * s))
// table: [max_pos, D] floats, cos in [:, :D/2], sin in [:, D/2:].
template <typename T>
void rope(T* x, int64_t ldx, int64_t rows, int64_t heads, int64_t D, const int64_t* positions, const float* table);

// out[n, i] = T(T(silu(gu[n, i])) * gu[n, I + i]): gate and up halves of one GEMM.
template <typename T>
void silu_mul(const T* gu, int64_t ldgu, T* out, int64_t ldo, int64_t rows, int64_t I);

// One sequence of a packed batch, for attention: its queries are rows
// [q_row, q_row + n_q) of q, at positions start, start + 1, ...; query i sees keys
// [lo, start + i] with lo = 0 (or start + i - window + 1 with a sliding window).
// k and v point at the sequence's store, [nkv, capacity, D] with the given strides.
template <typename T>
struct AttentionSeq {
  int64_t q_row = 0;
  int64_t n_q = 0;
  int64_t start = 0;
  const T* k = nullptr;
  const T* v = nullptr;
};

struct AttentionShape {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t kv_head_stride = 0;  // elements between kv heads in a store
  int64_t kv_pos_stride = 0;   // elements between positions
  int64_t window = 0;          // 0: full causal
  float scale = 1.0f;
};

// out[row, h*D:(h+1)*D] = softmax(scale * q_h k^T) v for every sequence, head and query
// (GQA: head h reads kv head h / (nh / nkv)). q, out: [N, nh * D] with row strides.
template <typename T>
void attention(const T* q, int64_t ldq, T* out, int64_t ldo, const AttentionSeq<T>* seqs, int64_t n_seqs,
               const AttentionShape& shape);

}  // namespace moa::cpu
