// The engine's dense linear, y = x W^T (+ b), and the choice of kernel behind it:
//   M <= small_m_limit() rows (decode), on an AVX-512 CPU:
//       the SIMD kernel (kernels/cpu/decode_avx512.h), which reads W once for every 4 rows;
//   otherwise:
//       ATen's BLAS (at::mm / addmm); for bfloat16 / float16 on a CPU without native
//       instructions for them, in float32 (the same products, rounded once).
// Dimension legend: M rows of x, K input features, N output features.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moa::engine {

// x [M, K] (unit column stride), w [N, K] contiguous, b [N] or undefined -> y [M, N], in
// x's dtype (float32, bfloat16 or float16).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// The most rows for which linear() takes the SIMD kernel: 32, or MOA_ENGINE_SMALL_M=N
// (an integer >= 0; 0 always takes BLAS), read once per process. Above it BLAS reuses W
// across more rows than the kernel's 4-row tiles. A bad value throws InvalidArgument
// naming the variable, the value and what is expected.
int64_t small_m_limit();

}  // namespace moa::engine
