// Float32 rows to GGML block types (quant_types.h): the inverse of dequantize_rows, for
// quantizing a float checkpoint when it is loaded and for writing GGUF files.
//
//   quantize_rows:  out row r = quantize(src[r * k .. r * k + k)), r < rows,
//                   each row qtype_row_bytes(type, k) bytes, rows back to back.
//
// Types and methods (each the same arithmetic as ggml's reference quantizer, so that a
// file written here reads as llama.cpp's own would):
//   F32, F16 (round to nearest even), BF16 (round to nearest even, NaN kept quiet);
//   Q8_0  d = max|x| / 127, q = round(x / d);
//   Q4_0  d = -(the x of largest |x|) / 8, q = min(15, trunc(x / d + 8.5));
//   Q4_1  d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5));
//   Q4_K  per 32-element sub-block, the scale and min found by a weighted least-squares
//         search over 21 candidate scales (weights |x| + rms(x)); then the 8 scales and
//         mins are quantized to 6 bits against the block's fp16 d and dmin, and the
//         elements requantized against the rounded scales.
// Bit-exact against the gguf package's quantizers for F16, BF16, Q8_0, Q4_0 and Q4_1
// (python_tests/test_quant_kernels.py); Q4_K is checked by its error and its round trip.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no model knowledge.
#pragma once

#include <cstdint>

#include "kernels/cpu/quant_types.h"

namespace moa::cpu {

// Whether quantize_rows can write `type` (the list above).
bool can_quantize(QType type);

// rows x k floats (row-major) -> rows x qtype_row_bytes(type, k) bytes. k must be a
// multiple of the type's block size; throws InvalidArgument for a type it cannot write
// or a k that does not fit. Not parallel: callers split the rows.
void quantize_rows(QType type, const float* src, int64_t rows, int64_t k, uint8_t* out);

}  // namespace moa::cpu
