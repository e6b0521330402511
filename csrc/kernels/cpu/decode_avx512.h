// AVX-512 kernels for the small-group (decode) path: one or a few tokens per expert,
// each reading its expert's weights once. Optional fast path: callers use the
// portable kernel when decode_avx512_available() is false.
//   shrink: vs[q][j]  = sum_i A[j * k + i] * xs[q][i]        (A: one expert's [r, in])
//   expand: ys[q][o] += scale * sum_j B[o * r + j] * vs[q][j]  (B: one expert's [out, r])
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace moa::cpu {

// Largest rank the AVX-512 expand takes (its v registers are sized for it).
constexpr int64_t kDecodeAvx512MaxRank = 256;

// True when this CPU has AVX-512 F/BW/VL/DQ and the build has the kernels.
bool decode_avx512_available();

// How bfloat16 rows are multiplied: avx512 widens both operands to float and uses FMA;
// avx512_bf16 multiplies bfloat16 pairs by vdpbf16ps (AVX512-BF16: twice the products per
// instruction, no widening), accumulating in float either way. Chosen once: the best this
// CPU has, unless MOA_ENGINE_BF16_ISA ("auto", "avx512", "avx512_bf16") says otherwise;
// set_bf16_isa() sets it at run time (tests and benchmarks; not thread-safe against running
// kernels) and returns the name in use. Naming a level this CPU lacks is InvalidArgument.
enum class Bf16Isa { avx512, avx512_bf16 };
// True when this CPU has AVX512-BF16 (vdpbf16ps) on top of decode_avx512_available().
bool bf16_dot_available();
Bf16Isa bf16_isa();
const char* bf16_isa_name(Bf16Isa isa);
std::string set_bf16_isa(const std::string& name);

// A dense linear for a few tokens (decode): for q < m and rows j in [row0, row1) of
// W [*, k]: ys[q][j] = sum_i W[j * k + i] * xs[q][i] (+ bias[j] when bias is not null),
// accumulated in float, rounded to T once. Tokens are taken 4 at a time per block of
// W rows, so W is read from memory once for any m.
template <typename T>
void linear_rows_avx512(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys, int64_t m,
                        const T* bias);

// For q < nt (nt <= 4) and rows j in [row0, row1) of A [*, k]:
//   vs[q][j] = sum_i A[j * k + i] * xs[q][i], accumulated in float, rounded to T.
template <typename T>
void shrink_block_avx512(const T* A, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* vs, int nt);

// For q < nt (nt <= 4) and rows o in [row0, row1) of B [*, r], r <= kDecodeAvx512MaxRank:
//   ys[q][o] += scale * sum_j B[o * r + j] * vs[q][j], in float, each y rounded once.
template <typename T>
void expand_block_avx512(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs, T* const* ys, int nt,
                         float scale);

}  // namespace moa::cpu
