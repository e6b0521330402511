// CUDA kernels for the engine's transformer forward (see transformer_cuda.h).
// Kernels tier (csrc/kernels/README.md): arithmetic only, no Python, no model knowledge.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/transformer_cuda.h"

namespace moa::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float f(T v) {
  return static_cast<float>(to_acc<T>(v));
}
template <typename T>
__device__ __forceinline__ T t(float v) {
  return from_acc<T>(v);
}
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return f<T>(t<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kNormThreads = 256;
constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / 32;

int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

// ---------------------------------------------------------------------------

template <typename T>
__global__ void rms_norm_kernel(const T* x, int64_t ldx, const T* w, T* y, int64_t H, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ldx;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = f(xr[i]);
    ss += v * v;
  }
  __shared__ float partial[kNormThreads / 32];
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
  const float r = rsqrtf(total / static_cast<float>(H) + eps);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) y[row * H + i] = t<T>(f(w[i]) * rounded<T>(f(xr[i]) * r));
}

template <typename T>
__global__ void silu_mul_kernel(const T* gu, int64_t ldgu, T* out, int64_t rows, int64_t I) {
  const int64_t total = rows * I;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / I, i = e % I;
    const float g = f(gu[n * ldgu + i]);
    const float silu = rounded<T>(g / (1.0f + expf(-g)));
    out[e] = t<T>(silu * f(gu[n * ldgu + I + i]));
  }
}

template <typename T>
__global__ void rope_kernel(T* x, int64_t ldx, int64_t rows, int64_t heads, int64_t D, const int64_t* positions,
                            const float* table) {
  const int64_t half = D / 2, total = rows * heads * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, h = (e / half) % heads, n = e / (half * heads);
    const float* tab = table + positions[n] * D;
    const float c = rounded<T>(tab[i]), s = rounded<T>(tab[half + i]);
    T* xh = x + n * ldx + h * D;
    const float a = f(xh[i]), b = f(xh[i + half]);
    xh[i] = t<T>(rounded<T>(a * c) - rounded<T>(b * s));
    xh[i + half] = t<T>(rounded<T>(b * c) + rounded<T>(a * s));
  }
}

template <typename T>
__global__ void store_kv_kernel(const T* qkv, int64_t ld, int64_t k_col, int64_t v_col, int64_t nkv, int64_t D,
                                const int64_t* dst, int64_t head_stride, T* k, T* v) {
  const int64_t n = blockIdx.x / nkv, g = blockIdx.x % nkv;
  if (dst[n] < 0) return;  // a row stored elsewhere (scoring's scratch)
  const T* src = qkv + n * ld;
  const int64_t off = dst[n] + g * head_stride;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    k[off + d] = src[k_col + g * D + d];
    v[off + d] = src[v_col + g * D + d];
  }
}

// One block per (chunk, head, sequence): warps take keys in turn with an online softmax,
// then merge through shared memory. Writes the output row (one chunk) or the partial.
template <typename T>
__global__ void decode_attention_kernel(const T* q, int64_t ldq, T* out, int64_t ldo, const int64_t* q_rows,
                                        const int64_t* base, const int64_t* lens, const T* k, const T* v,
                                        DecodeAttention s) {
  const int64_t chunk = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;
  const int64_t D = s.head_dim, group = s.n_heads / s.n_kv_heads, g = h / group;
  const int64_t len = lens[seq];
  const int64_t lo_seq = s.window > 0 && len > s.window ? len - s.window : 0;
  const int64_t lo = max(lo_seq, chunk * s.chunk), hi = min(len, (chunk + 1) * s.chunk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  __shared__ float qs[kMaxHeadDim];
  __shared__ float wm[kAttnWarps], wl[kAttnWarps];
  __shared__ float wacc[kAttnWarps][kMaxHeadDim];
  const T* qh = q + q_rows[seq] * ldq + h * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) qs[d] = f(qh[d]);
  __syncthreads();

  const T* kh = k + base[seq] + g * s.head_stride;
  const T* vh = v + base[seq] + g * s.head_stride;
  float m = -INFINITY, l = 0.0f, acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  for (int64_t j = lo + warp; j < hi; j += kAttnWarps) {
    const T* kj = kh + j * D;
    float dot = 0.0f;
    for (int64_t d = lane; d < D; d += 32) dot += qs[d] * f(kj[d]);
    const float score = warp_sum(dot) * s.scale;
    const float next = fmaxf(m, score);
    const float corr = expf(m - next), p = expf(score - next);
    l = l * corr + p;
    const T* vj = vh + j * D;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) acc[i] = acc[i] * corr + p * f(vj[d]);
    }
    m = next;
  }
  if (lane == 0) wm[warp] = m, wl[warp] = l;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) wacc[warp][d] = acc[i];
  }
  __syncthreads();

  float M = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, wm[w]);
  float L = 0.0f;
  for (int w = 0; w < kAttnWarps; ++w)
    if (wm[w] != -INFINITY) L += wl[w] * expf(wm[w] - M);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w)
      if (wm[w] != -INFINITY) a += wacc[w][d] * expf(wm[w] - M);
    if (s.n_chunks == 1) {
      out[q_rows[seq] * ldo + h * D + d] = t<T>(a / L);
    } else {
      float* part = s.partials + ((seq * s.n_heads + h) * s.n_chunks + chunk) * (D + 2);
      part[2 + d] = a;
      if (d == 0) part[0] = M, part[1] = L;
    }
  }
}

// Merges the chunks' partials of one (head, sequence) into its output row.
template <typename T>
__global__ void decode_attention_merge_kernel(T* out, int64_t ldo, const int64_t* q_rows, DecodeAttention s) {
  const int64_t h = blockIdx.x, seq = blockIdx.y, D = s.head_dim;
  const float* parts = s.partials + (seq * s.n_heads + h) * s.n_chunks * (D + 2);
  float M = -INFINITY;
  for (int64_t c = 0; c < s.n_chunks; ++c) M = fmaxf(M, parts[c * (D + 2)]);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float L = 0.0f, a = 0.0f;
    for (int64_t c = 0; c < s.n_chunks; ++c) {
      const float* p = parts + c * (D + 2);
      if (p[0] == -INFINITY) continue;
      const float w = expf(p[0] - M);
      L += p[1] * w;
      a += p[2 + d] * w;
    }
    out[q_rows[seq] * ldo + h * D + d] = t<T>(a / L);
  }
}

}  // namespace

template <typename T>
void rms_norm(const T* x, int64_t ldx, const T* w, T* y, int64_t rows, int64_t H, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  rms_norm_kernel<T><<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(x, ldx, w, y, H, eps);
}

template <typename T>
void silu_mul(const T* gu, int64_t ldgu, T* out, int64_t rows, int64_t I, cudaStream_t stream) {
  if (rows * I == 0) return;
  const int blocks = std::min(blocks_for(rows * I, 256), 65535);
  silu_mul_kernel<T><<<blocks, 256, 0, stream>>>(gu, ldgu, out, rows, I);
}

template <typename T>
void rope(T* x, int64_t ldx, int64_t rows, int64_t heads, int64_t D, const int64_t* positions, const float* table,
          cudaStream_t stream) {
  const int64_t total = rows * heads * (D / 2);
  if (total == 0) return;
  const int blocks = std::min(blocks_for(total, 256), 65535);
  rope_kernel<T><<<blocks, 256, 0, stream>>>(x, ldx, rows, heads, D, positions, table);
}

template <typename T>
void store_kv(const T* qkv, int64_t ld, int64_t rows, int64_t k_col, int64_t v_col, int64_t nkv, int64_t D,
              const int64_t* dst, int64_t head_stride, T* k, T* v, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(D, 256));
  store_kv_kernel<T><<<static_cast<unsigned>(rows * nkv), threads, 0, stream>>>(qkv, ld, k_col, v_col, nkv, D, dst,
                                                                                head_stride, k, v);
}

template <typename T>
void decode_attention(const T* q, int64_t ldq, T* out, int64_t ldo, const int64_t* q_rows, const int64_t* base,
                      const int64_t* len, int64_t n_seqs, const T* k, const T* v, const DecodeAttention& shape,
                      cudaStream_t stream) {
  if (n_seqs == 0) return;
  const dim3 grid(static_cast<unsigned>(shape.n_chunks), static_cast<unsigned>(shape.n_heads),
                  static_cast<unsigned>(n_seqs));
  decode_attention_kernel<T><<<grid, kAttnThreads, 0, stream>>>(q, ldq, out, ldo, q_rows, base, len, k, v, shape);
  if (shape.n_chunks > 1) {
    const dim3 merge(static_cast<unsigned>(shape.n_heads), static_cast<unsigned>(n_seqs));
    const int threads = static_cast<int>(std::min<int64_t>(shape.head_dim, 256));
    decode_attention_merge_kernel<T><<<merge, threads, 0, stream>>>(out, ldo, q_rows, shape);
  }
}

#define MOA_INSTANTIATE_TRANSFORMER_CUDA(T)                                                                          \
  template void rms_norm<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, float, cudaStream_t);                 \
  template void silu_mul<T>(const T*, int64_t, T*, int64_t, int64_t, cudaStream_t);                                  \
  template void rope<T>(T*, int64_t, int64_t, int64_t, int64_t, const int64_t*, const float*, cudaStream_t);         \
  template void store_kv<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, int64_t, \
                            T*, T*, cudaStream_t);                                                                   \
  template void decode_attention<T>(const T*, int64_t, T*, int64_t, const int64_t*, const int64_t*, const int64_t*,  \
                                    int64_t, const T*, const T*, const DecodeAttention&, cudaStream_t);
MOA_INSTANTIATE_TRANSFORMER_CUDA(float)
MOA_INSTANTIATE_TRANSFORMER_CUDA(__half)
MOA_INSTANTIATE_TRANSFORMER_CUDA(__nv_bfloat16)

}  // namespace moa::cuda
