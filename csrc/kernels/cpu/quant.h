// Weight-only quantized linear on CPU: GGML block types (quant_types.h) times float
// activations, accumulated in float. Activations are never quantized, so the result
// equals x @ dequantize(W)^T up to float rounding.
//
//   dequantize_rows:  out[(r - row0) * k + i] = W[r][i] as float, for r in [row0, row1)
//   quant_linear:     y[q][j] = sum_i W[j][i] * x[q][i] (+ bias[j])
//
// Kernels by instruction set, chosen once at run time (quant_isa()): AVX-512 for the
// 32-element block types (Q8_0, Q4_0, Q4_1) and the float ones, the portable C++ for the
// rest and on every other CPU. MOA_ENGINE_QUANT_ISA=portable forces the portable code
// (tests run both); set_quant_isa() does the same at run time.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no model knowledge.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/cpu/quant_types.h"

namespace moa::cpu {

enum class QuantIsa { portable, avx512 };

// The kernels in use: the best this CPU runs, capped by MOA_ENGINE_QUANT_ISA
// ("portable" or "avx512"; read once) or set_quant_isa().
QuantIsa quant_isa();
const char* quant_isa_name(QuantIsa isa);
// Caps the kernels at `name` ("portable", "avx512", or "auto": the best this CPU has);
// returns the name now in use. Throws InvalidArgument for another name. Not thread-safe
// against running kernels: for tests and benchmarks.
std::string set_quant_isa(const std::string& name);

// Rows [row0, row1) of a [*, k] matrix of `type` (k a multiple of its block size) whose
// rows are `row_bytes` apart, dequantized into out (row1 - row0 rows of k floats).
void dequantize_rows(QType type, const uint8_t* data, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                     float* out);

// ys[q][j] = dot(W row j, xs[q]) (+ bias[j]) for j in [row0, row1), q < m, in float.
// W: rows of `type`, row_bytes apart, k elements each. Rows are dequantized in tiles of
// 16 into a float buffer the caller does not see, so any m reads W once.
void quant_linear_rows(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                       const float* const* xs, float* const* ys, int64_t m, const float* bias);

}  // namespace moa::cpu
