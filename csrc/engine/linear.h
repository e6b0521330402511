// The engine's dense linear, y = x W^T (+ b), and the choice of kernel behind it:
//   M <= small_m_limit() rows (decode), on an AVX-512 CPU:
//       the SIMD kernel (kernels/cpu/decode_avx512.h), which reads W once for every 4 rows;
//   otherwise:
//       ATen's BLAS (at::mm / addmm); for bfloat16 / float16 on a CPU without native
//       instructions for them, in float32 (the same products, rounded once).
// A quantized W (GGML block types, kernels/cpu/quant.h) is multiplied in float32 with
// float activations (weight-only: x is never quantized):
//   M <= small_m_limit() (on the AVX2 level 12 unless MOA_ENGINE_SMALL_M is set): tiles of
//       16 rows dequantized into L1, then the SIMD kernel (Q8_0, Q4_0, Q4_1: dequantized in
//       registers for up to 8 rows (AVX2) or 4 (AVX-512));
//   otherwise, and at any M with the portable kernels (no AVX2 / AVX-512): tiles of 128 rows
//   dequantized, then BLAS;
// except that with the int8 kernels chosen (cpu::quant_isa() == avx512_vnni, opt-in),
// Q8_0 / Q4_0 / Q4_1 at M <= int8_m_limit() take them: x quantized per block of 32 as
// llama.cpp does, integer dot products; and with the bfloat16 kernels chosen
// (cpu::quant_isa() == avx512_bf16, opt-in), 4 < M <= small_m_limit() rows of any type take
// them: x and the dequantized tiles rounded to bfloat16, vdpbf16ps into float.
// Dimension legend: M rows of x, K input features, N output features.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/cpu/quant_types.h"

namespace moa::engine {

// x [M, K] (unit column stride), w [N, K] contiguous, b [N] or undefined -> y [M, N], in
// x's dtype (float32, bfloat16 or float16).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// One run of rows of a quantized matrix, all of one GGML type: data is uint8
// [rows, row_bytes], contiguous, each row one GGUF row of k elements.
struct QuantRows {
  cpu::QType type = cpu::QType::F32;
  at::Tensor data;
  int64_t rows = 0;
};

// A weight matrix [n, k]: dense (`dense`, in the engine's dtype) or quantized (`quant`:
// runs of rows in order; a fused q/k/v or gate/up matrix may mix types, as Q4_K_M files do).
struct Matrix {
  at::Tensor dense;
  std::vector<QuantRows> quant;
  int64_t n = 0, k = 0;

  bool defined() const { return dense.defined() || !quant.empty(); }
  bool quantized() const { return !quant.empty(); }
  // Held bytes. (Inline, as of(): the loaders use them without linking the kernels.)
  int64_t bytes() const {
    int64_t total = dense.defined() ? dense.numel() * static_cast<int64_t>(dense.element_size()) : 0;
    for (const QuantRows& run : quant) total += run.data.numel();
    return total;
  }
  // A dense matrix (2-D), or an undefined one.
  static Matrix of(at::Tensor dense) {
    Matrix m;
    if (dense.defined() && dense.dim() == 2) m.n = dense.size(0), m.k = dense.size(1);
    m.dense = std::move(dense);
    return m;
  }
};

// linear() for either kind of W; y is in x's dtype.
at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b);

// Rows ids [N] of w as [N, k] in `dtype`: the embedding lookup.
at::Tensor embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype);

// The most rows for which linear() takes the SIMD kernel: 32, or MOA_ENGINE_SMALL_M=N
// (an integer >= 0; 0 always takes BLAS), read once per process. Above it BLAS reuses W
// across more rows than the kernel's 4-row tiles. A bad value throws InvalidArgument
// naming the variable, the value and what is expected.
int64_t small_m_limit();

// The most rows for which a Q8_0 / Q4_0 / Q4_1 matrix takes the int8 kernels
// (cpu::quant_linear_rows_int8: activations quantized per block of 32) when they are the
// kernels in use (cpu::quant_isa() == avx512_vnni); at most small_m_limit() rows take them.
// 8 (above it the float kernels are faster: they reuse each dequantized tile across more
// rows), or MOA_ENGINE_INT8_M=N (0: never), read once per process.
int64_t int8_m_limit();

}  // namespace moa::engine
