// AVX-512 expand for the small-group (decode) path: y[o] += scale * dot(B[o, :], v)
// for 16 output rows at a time, with the 16 dot products reduced by one shuffle tree
// instead of 16 horizontal sums. Optional fast path: callers fall back to the
// portable kernel when expand_avx512_available() is false.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace moa::cpu {

// Largest rank the AVX-512 expand takes (its v registers are sized for it).
constexpr int64_t kExpandAvx512MaxRank = 256;

// True when this CPU has AVX-512 F/BW/VL/DQ and the build has the kernel.
bool expand_avx512_available();

// For q < nt (nt <= 4) and rows o in [row0, row1):
//   ys[q][o] += scale * sum_j B[o * r + j] * vs[q][j]       (B: one expert's [out, r])
// r <= kExpandAvx512MaxRank. Accumulates in float; each y element is rounded once.
template <typename T>
void expand_block_avx512(const T* B, int64_t r, int64_t row0, int64_t row1,
                         const T* const* vs, T* const* ys, int nt, float scale);

}  // namespace moa::cpu
