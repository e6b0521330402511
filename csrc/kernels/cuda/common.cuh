// Device helpers shared by the CUDA grouped LoRA kernels: element types and their
// accumulation types, 16-byte vectors, warp reductions, host-side dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/grouped_lora_cuda.h"
#include "kernels/cuda/tiling.h"

namespace moa::cuda {

// ---------------------------------------------------------------------------------------
// Element types. acc_t: float, or double for double. Conversions round to nearest even.

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline constexpr bool kIsHalfLike = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_acc<T>(acc_t<T>(0));
}

// ---------------------------------------------------------------------------------------
// 16-byte vectors of elements.

template <typename T>
inline constexpr int kVec = static_cast<int>(tiling::kVecBytes / sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};
static_assert(sizeof(Vec<__half>) == tiling::kVecBytes && sizeof(Vec<double>) == tiling::kVecBytes);

// Global memory, read-only for the kernel's lifetime.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec_global(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T> out;
  *reinterpret_cast<uint4*>(&out) = raw;
  return out;
}

template <typename T>
__device__ __forceinline__ Vec<T> load_vec_shared(const T* p) {
  Vec<T> out;
  *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(p);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec_shared(T* p, const Vec<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

template <typename T>
__device__ __forceinline__ Vec<T> zero_vec() {
  Vec<T> out;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out.v[i] = zero_value<T>();
  return out;
}

// Whether rows p + i * ld can be read with 16-byte loads.
template <typename T>
inline bool vec_ok(const void* data, int64_t ld) {
  return reinterpret_cast<uintptr_t>(data) % tiling::kVecBytes == 0 && ld % kVec<T> == 0;
}

// ---------------------------------------------------------------------------------------
// Warp reductions: the sum over `width` lanes (a power of two <= 32) lands in each of them.

template <typename A>
__device__ __forceinline__ A sub_warp_sum(A v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// For device code (std::min / std::max are host functions there without
// --expt-relaxed-constexpr, which CMake builds do not pass).
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------
// Host-side dtype dispatch: calls fn(T{}) with the element type of `dtype`.

template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat16: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat64: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace moa::cuda
