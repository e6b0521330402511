// AVX2 decode kernels: the same three products as decode_avx512.h (the engine's dense linear
// for a few tokens, and the grouped op's small-group shrink and expand), 8 floats a register,
// for CPUs with AVX2, FMA and F16C but no AVX-512 (AMD Zen 2 / Zen 3, Intel Haswell to
// Comet Lake). Same contracts as their AVX-512 twins: float accumulation, each output
// rounded to T once. Callers take them when cpu_isa() is CpuIsa::avx2.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace moa::cpu {

// The level of the engine's CPU decode kernels (dense linear for few rows, the grouped op's
// small groups, attention, RMSNorm, RoPE, SiLU-and-multiply): the best this CPU has unless
// MOA_ENGINE_CPU_ISA ("auto", "portable", "avx2", "avx512") says otherwise; read once.
// Naming a level this CPU lacks, or an unknown one, is InvalidArgument naming the variable.
enum class CpuIsa { portable, avx2, avx512 };
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// Largest rank expand_block_avx2 takes.
constexpr int64_t kDecodeAvx2MaxRank = 256;

// ys[q][j] = sum_i W[j * k + i] * xs[q][i] (+ bias[j]) for q < m, rows j in [row0, row1).
template <typename T>
void linear_rows_avx2(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys, int64_t m,
                      const T* bias);

// vs[q][j] = sum_i A[j * k + i] * xs[q][i] for q < nt (nt <= 4), rows j in [row0, row1).
template <typename T>
void shrink_block_avx2(const T* A, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* vs, int nt);

// ys[q][o] += scale * sum_j B[o * r + j] * vs[q][j] for q < nt (nt <= 4), rows o in
// [row0, row1), r <= kDecodeAvx2MaxRank.
template <typename T>
void expand_block_avx2(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs, T* const* ys, int nt,
                       float scale);

}  // namespace moa::cpu
