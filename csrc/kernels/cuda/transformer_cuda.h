// CUDA kernels for the engine's transformer forward on a GPU (the CUDA backend,
// engine/backend_cuda.cpp): RMSNorm, RoPE, SiLU-and-multiply, the KV-cache store and
// decode attention over the slot cache. Arithmetic only: callers check shapes. Each
// call launches on `stream` and never synchronizes with the host.
//
// Numerics are those of kernels/cpu/transformer_cpu.h: each step that transformers'
// Llama modules round to the storage type T is rounded here too; reductions accumulate
// in float32. T is float, __half or __nv_bfloat16.
//
// Dimension legend: N tokens (rows), H hidden size, D head dim, nh / nkv heads, I
// intermediate size, S sequences.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moa::cuda {

// y[n] = T(w * T(x[n] * rsqrt(mean(x[n]^2) + eps))); y is [N, H] contiguous.
template <typename T>
void rms_norm(const T* x, int64_t ldx, const T* w, T* y, int64_t rows, int64_t H, float eps, cudaStream_t stream);

// out[n, i] = T(T(silu(gu[n, i])) * gu[n, I + i]); out is [N, I] contiguous.
template <typename T>
void silu_mul(const T* gu, int64_t ldgu, T* out, int64_t rows, int64_t I, cudaStream_t stream);

// Rotary embedding in place on `heads` heads of D per row (rotate-half layout), with
// c = T(table[pos][i]), s = T(table[pos][D/2 + i]); positions [N] on the device.
template <typename T>
void rope(T* x, int64_t ldx, int64_t rows, int64_t heads, int64_t D, const int64_t* positions, const float* table,
          cudaStream_t stream);

// For each row n, copies its nkv key heads (columns k_col + g*D) and value heads (v_col
// + g*D) of qkv to k / v + dst[n] + g * head_stride: dst[n] is the element offset of the
// row's (store, head 0, position) in the cache, or -1 for a row that is not stored there.
template <typename T>
void store_kv(const T* qkv, int64_t ld, int64_t rows, int64_t k_col, int64_t v_col, int64_t nkv, int64_t D,
              const int64_t* dst, int64_t head_stride, T* k, T* v, cudaStream_t stream);

// One query per sequence (decode). Sequence s: its query is row q_rows[s] of q ([., nh*D],
// row stride ldq); its keys and values are positions [lo, len[s]) of the store at element
// offset base[s] of k / v ([nkv, capacity, D] per store, head stride head_stride, position
// stride D), lo = 0 or len[s] - window. out row q_rows[s] = softmax(scale q k^T) v per head
// (GQA: head h reads kv head h / (nh / nkv)). Split-K: the keys are cut into chunks of
// `chunk` positions, each chunk's partial (max, sum, acc) written to `partials`
// ([S, nh, n_chunks, D + 2] float32) and merged in a second launch.
struct DecodeAttention {
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t head_stride = 0;
  int64_t window = 0;
  float scale = 1.0f;
  int64_t chunk = 512;   // keys per split-K block
  int64_t n_chunks = 1;  // ceil(longest len / chunk)
  float* partials = nullptr;
};
template <typename T>
void decode_attention(const T* q, int64_t ldq, T* out, int64_t ldo, const int64_t* q_rows, const int64_t* base,
                      const int64_t* len, int64_t n_seqs, const T* k, const T* v, const DecodeAttention& shape,
                      cudaStream_t stream);

}  // namespace moa::cuda
