// Weight-only quantized linear on CPU: GGML block types (quant_types.h) times float
// activations, accumulated in float. Activations are never quantized, so the result
// equals x @ dequantize(W)^T up to float rounding.
//
//   dequantize_rows:  out[(r - row0) * k + i] = W[r][i] as float, for r in [row0, row1)
//   quant_linear:     y[q][j] = sum_i W[j][i] * x[q][i] (+ bias[j])
//
// Kernels by instruction set, chosen once at run time (quant_isa()): AVX-512 for the
// 32-element block types (Q8_0, Q4_0, Q4_1) and the float ones; on a CPU with AVX2, FMA and
// F16C but not AVX-512, their 256-bit counterparts; the portable C++ for the rest and on every
// other CPU. Opt-in on AVX512-VNNI CPUs, the int8 path below
// (activations quantized per block of 32, as llama.cpp does; it costs held-out perplexity);
// opt-in on AVX512-BF16 CPUs, the bfloat16 path (activations and dequantized weights rounded
// to bfloat16 for products of several rows; twice the products per instruction).
// MOA_ENGINE_QUANT_ISA (portable, avx2, avx512, avx512_vnni, avx512_bf16, weight_only, auto) sets
// the choice
// (tests run every path the CPU has); set_quant_isa() does the same at run time.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no model knowledge.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/quant_types.h"

namespace moa::cpu {

enum class QuantIsa { portable, avx512, avx512_vnni, avx512_bf16, avx2 };

// The kernels in use: the best weight-only ones this CPU runs unless MOA_ENGINE_QUANT_ISA
// (read once) or set_quant_isa() chose others.
QuantIsa quant_isa();
const char* quant_isa_name(QuantIsa isa);
// Sets the kernels to `name` ("portable", "avx2", "avx512", "avx512_vnni" (opt-in: the int8 path),
// "avx512_bf16" (opt-in: the bfloat16 path),
// or "auto" / "weight_only": the best this CPU has with float activations, the default);
// returns the name now in use. Throws InvalidArgument for another name or one this CPU
// lacks. Not thread-safe against running kernels: for tests and benchmarks.
std::string set_quant_isa(const std::string& name);

// The int8 path (QuantIsa::avx512_vnni, AVX512-VNNI): activations quantized as ggml's Q8_0
// quantizes them, per token and block of 32 (d = max|x| / 127 in float, q = round(x / d)),
// then integer dot products with the weight blocks (vpdpbusd), each block's result scaled by
// d_w * d_x in float. Q4_1's minimum multiplies the block's exact float sum of x.
struct Int8Rows {
  int64_t m = 0, k = 0;
  std::vector<int8_t> q;      // [m, k]
  std::vector<float> d;       // [m, k / 32]
  std::vector<int32_t> qsum;  // [m, k / 32]: sum of the block's q
  std::vector<float> xsum;    // [m, k / 32]: sum of the block's x
};

// Whether quant_linear_rows_int8 runs `type` with the kernels in use (avx512_vnni; Q8_0,
// Q4_0, Q4_1; k a multiple of 32).
bool int8_kernel(QType type, int64_t k);

// xs[q][0 .. k) for q < m into `out` (k a multiple of 32).
void quantize_activations(const float* const* xs, int64_t m, int64_t k, Int8Rows& out);

// ys[q][j] = sum over blocks of d_w d_x (w_q . x_q) (Q4_0: minus 8 d_w d_x sum(x_q);
// Q4_1: plus m_w sum(x)) (+ bias[j]), for j in [row0, row1), q < acts.m. Requires
// int8_kernel(type, k).
void quant_linear_rows_int8(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                            const Int8Rows& acts, float* const* ys, const float* bias);

// The bfloat16 path (QuantIsa::avx512_bf16, AVX512-BF16): activations rounded to bfloat16
// (to nearest even) once per product, each tile of 16 weight rows dequantized in float and
// rounded to bfloat16 into L1, then bfloat16 pairs multiplied by vdpbf16ps into float
// accumulators. Twice the products per instruction of the float kernels, for the products
// of several rows (batched decode), where those kernels are bound by their FMAs.
// Whether quant_linear_rows_bf16 runs `type` with the kernels in use (avx512_bf16; any
// type whose rows are whole blocks of 32, k a multiple of 32).
bool bf16_kernel(QType type, int64_t k);

// xs[q][0 .. k) for q < m rounded to bfloat16 into out[q * k ..] (k a multiple of 32).
void round_activations_bf16(const float* const* xs, int64_t m, int64_t k, std::vector<uint16_t>& out);

// ys[q][j] = sum_i bf16(W[j][i]) bf16(x[q][i]) (+ bias[j]), accumulated in float, for j in
// [row0, row1), q < m; x: m rows of k bfloat16 bits (round_activations_bf16). Requires
// bf16_kernel(type, k).
void quant_linear_rows_bf16(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                            const uint16_t* x, int64_t m, float* const* ys, const float* bias);

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
