// AVX2 decode kernels (see decode_avx2.h), by per-function target attributes, so the rest of
// the build stays portable. Their shapes follow decode_avx512.cpp, resized for 16 vector
// registers instead of 32:
//
// linear, 1-2 tokens: one row of W at a time (one sequential stream for the prefetcher),
//   4 chunks of 8 in flight per token;
// linear, 3+ tokens: tiles of 4 rows by 2 tokens (8 accumulators, 2 x vectors and one W
//   vector: 11 of the 16 registers), the 4-row block staying in L1 across the token pairs;
// expand: 8 rows' dot products reduced together (reduce8) instead of 8 horizontal sums.
#include "kernels/cpu/decode_avx2.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels/cpu/avx2_util.h"
#include "kernels/cpu/avx512_util.h"  // from_float
#include "kernels/cpu/decode_avx512.h"
#include "moa/errors.h"

namespace moa::cpu {

bool avx2_available() {
#if MOA_HAVE_AVX2
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

namespace {

CpuIsa best_cpu_isa() {
  if (decode_avx512_available()) return CpuIsa::avx512;
  if (avx2_available()) return CpuIsa::avx2;
  return CpuIsa::portable;
}

CpuIsa read_cpu_isa() {
  const char* env = std::getenv("MOA_ENGINE_CPU_ISA");
  const std::string name = env != nullptr ? env : "";
  if (name.empty() || name == "auto") return best_cpu_isa();
  if (name == "portable") return CpuIsa::portable;
  if (name == "avx2") {
    if (!avx2_available()) throw_error<InvalidArgument>("MOA_ENGINE_CPU_ISA='avx2', but this CPU has no AVX2/FMA/F16C");
    return CpuIsa::avx2;
  }
  if (name == "avx512") {
    if (!decode_avx512_available())
      throw_error<InvalidArgument>("MOA_ENGINE_CPU_ISA='avx512', but this CPU (or build) has no AVX-512 F/BW/VL/DQ");
    return CpuIsa::avx512;
  }
  throw_error<InvalidArgument>("MOA_ENGINE_CPU_ISA must be 'auto', 'portable', 'avx2' or 'avx512', got '", name, "'");
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = read_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "portable";
  }
}

#if MOA_HAVE_AVX2
namespace {
using namespace avx2;

// out[q] = dot(a, xs[q]) for q < NT: CH chunks of 8 a step in CH * NT accumulators.
template <int NT, int CH, typename T>
MOA_AVX2 inline void dot_row(const T* a, int64_t k, const T* const* xs, float* out) {
  __m256 acc[CH][NT];
#pragma GCC unroll 8
  for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
    for (int q = 0; q < NT; ++q) acc[c][q] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * CH <= k; i += 8 * CH) {
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c) {
      const __m256 av = load8(a + i + 8 * c);
#pragma GCC unroll 8
      for (int q = 0; q < NT; ++q) acc[c][q] = _mm256_fmadd_ps(av, load8(xs[q] + i + 8 * c), acc[c][q]);
    }
  }
  for (; i + 8 <= k; i += 8) {
    const __m256 av = load8(a + i);
#pragma GCC unroll 8
    for (int q = 0; q < NT; ++q) acc[0][q] = _mm256_fmadd_ps(av, load8(xs[q] + i), acc[0][q]);
  }
  if (i < k) {
    const __m256 av = load8_tail(a + i, k - i);
#pragma GCC unroll 8
    for (int q = 0; q < NT; ++q) acc[0][q] = _mm256_fmadd_ps(av, load8_tail(xs[q] + i, k - i), acc[0][q]);
  }
#pragma GCC unroll 8
  for (int q = 0; q < NT; ++q) {
    __m256 sum = acc[0][q];
#pragma GCC unroll 8
    for (int c = 1; c < CH; ++c) sum = _mm256_add_ps(sum, acc[c][q]);
    out[q] = hsum8(sum);
  }
}

template <int NT, typename T>
MOA_AVX2 void rows_one_by_one(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys,
                              const T* bias) {
  // One or two tokens: 4 chunks in flight per token. Three or more: one accumulator chain per
  // token, the order of the tiles (rows_times_tokens), so a token's result does not depend on
  // how many others share its step once there are three (as on the AVX-512 level).
  constexpr int CH = NT <= 2 ? 4 : 1;
  for (int64_t j = row0; j < row1; ++j) {
    float out[NT];
    dot_row<NT, CH>(W + j * k, k, xs, out);
    const float b = bias != nullptr ? static_cast<float>(bias[j]) : 0.0f;
    for (int q = 0; q < NT; ++q) ys[q][j] = from_float<T>(out[q] + b);
  }
}

// out[q * RB + rr] = dot(W row rr, xs[q]) for rr < RB, q < NT.
template <int RB, int NT, typename T>
MOA_AVX2 inline void dot_tile(const T* A, int64_t k, const T* const* xs, float* out) {
  __m256 acc[RB][NT];
#pragma GCC unroll 4
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 2
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 xv[NT];
#pragma GCC unroll 2
    for (int q = 0; q < NT; ++q) xv[q] = load8(xs[q] + i);
#pragma GCC unroll 4
    for (int rr = 0; rr < RB; ++rr) {
      const __m256 av = load8(A + rr * k + i);
#pragma GCC unroll 2
      for (int q = 0; q < NT; ++q) acc[rr][q] = _mm256_fmadd_ps(av, xv[q], acc[rr][q]);
    }
  }
  if (i < k) {
    __m256 xv[NT];
    for (int q = 0; q < NT; ++q) xv[q] = load8_tail(xs[q] + i, k - i);
    for (int rr = 0; rr < RB; ++rr) {
      const __m256 av = load8_tail(A + rr * k + i, k - i);
      for (int q = 0; q < NT; ++q) acc[rr][q] = _mm256_fmadd_ps(av, xv[q], acc[rr][q]);
    }
  }
#pragma GCC unroll 4
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 2
    for (int q = 0; q < NT; ++q) out[q * RB + rr] = hsum8(acc[rr][q]);
}

template <int RB, int NT, typename T>
MOA_AVX2 inline void tile_store(const T* W, int64_t k, int64_t j, const T* const* xs, T* const* ys, const T* bias) {
  float out[RB * NT];
  dot_tile<RB, NT>(W + j * k, k, xs, out);
  for (int q = 0; q < NT; ++q)
    for (int rr = 0; rr < RB; ++rr) {
      const float b = bias != nullptr ? static_cast<float>(bias[j + rr]) : 0.0f;
      ys[q][j + rr] = from_float<T>(out[q * RB + rr] + b);
    }
}

template <int RB, typename T>
MOA_AVX2 void rows_times_tokens(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys,
                                int64_t m, const T* bias) {
  const int64_t block_bytes = RB * k * int64_t(sizeof(T));
  int64_t j = row0;
  for (; j + RB <= row1; j += RB) {
    // The next block into L2 while this one serves every token (its RB rows, read side by
    // side, are short streams that the hardware prefetcher starts late).
    if (j + 2 * RB <= row1) {
      const char* next = reinterpret_cast<const char*>(W + (j + RB) * k);
      for (int64_t b = 0; b < block_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
    }
    int64_t q = 0;
    for (; q + 2 <= m; q += 2) tile_store<RB, 2>(W, k, j, xs + q, ys + q, bias);
    if (q < m) tile_store<RB, 1>(W, k, j, xs + q, ys + q, bias);
  }
  for (; j < row1; ++j) {
    int64_t q = 0;
    for (; q + 2 <= m; q += 2) tile_store<1, 2>(W, k, j, xs + q, ys + q, bias);
    if (q < m) tile_store<1, 1>(W, k, j, xs + q, ys + q, bias);
  }
}

// y[o + i] += scale * dot(B row o + i, v) for i < n (n <= 8); v holds C chunks of 8 floats,
// zeros past r.
template <typename T>
MOA_AVX2 inline void expand_8_rows(const T* B, int64_t r, int64_t o, int64_t n, const float* v, T* y, float scale) {
  const int64_t full = r / 8;
  __m256 p[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    __m256 acc = _mm256_setzero_ps();
    if (i < n) {
      const T* b = B + (o + i) * r;
      int64_t c = 0;
      for (; c < full; ++c) acc = _mm256_fmadd_ps(load8(b + 8 * c), _mm256_loadu_ps(v + 8 * c), acc);
      if (8 * c < r) acc = _mm256_fmadd_ps(load8_tail(b + 8 * c, r - 8 * c), _mm256_loadu_ps(v + 8 * c), acc);
    }
    p[i] = acc;
  }
  const __m256 s = _mm256_mul_ps(reduce8(p), _mm256_set1_ps(scale));
  if constexpr (std::is_same_v<T, float>) {
    if (n == 8) {
      _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), s));
      return;
    }
  }
  float out[8];
  _mm256_storeu_ps(out, s);
  for (int64_t i = 0; i < n; ++i) y[o + i] = from_float<T>(static_cast<float>(y[o + i]) + out[i]);
}

}  // namespace

template <typename T>
void linear_rows_avx2(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys, int64_t m,
                      const T* bias) {
  switch (m) {
    case 1: return rows_one_by_one<1>(W, k, row0, row1, xs, ys, bias);
    case 2: return rows_one_by_one<2>(W, k, row0, row1, xs, ys, bias);
    case 3: return rows_one_by_one<3>(W, k, row0, row1, xs, ys, bias);
    case 4: return rows_one_by_one<4>(W, k, row0, row1, xs, ys, bias);
    case 5: return rows_one_by_one<5>(W, k, row0, row1, xs, ys, bias);
    case 6: return rows_one_by_one<6>(W, k, row0, row1, xs, ys, bias);
    case 7: return rows_one_by_one<7>(W, k, row0, row1, xs, ys, bias);
    case 8: return rows_one_by_one<8>(W, k, row0, row1, xs, ys, bias);
    default: return rows_times_tokens<4>(W, k, row0, row1, xs, ys, m, bias);
  }
}

template <typename T>
void shrink_block_avx2(const T* A, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* vs, int nt) {
  linear_rows_avx2(A, k, row0, row1, xs, vs, nt, static_cast<const T*>(nullptr));
}

template <typename T>
void expand_block_avx2(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs, T* const* ys, int nt,
                       float scale) {
  alignas(32) float v[kDecodeAvx2MaxRank + 8];
  const int64_t padded = (r + 7) / 8 * 8;
  for (int q = 0; q < nt; ++q) {
    for (int64_t j = 0; j < r; ++j) v[j] = static_cast<float>(vs[q][j]);
    for (int64_t j = r; j < padded; ++j) v[j] = 0.0f;
    for (int64_t o = row0; o < row1; o += 8) expand_8_rows(B, r, o, std::min<int64_t>(8, row1 - o), v, ys[q], scale);
  }
}

#else  // no AVX2 kernels in this build: never called (cpu_isa() is never avx2)

template <typename T>
void linear_rows_avx2(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int64_t, const T*) {}
template <typename T>
void shrink_block_avx2(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int) {}
template <typename T>
void expand_block_avx2(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int, float) {}

#endif

#define MOA_INSTANTIATE(T)                                                                                    \
  template void linear_rows_avx2<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int64_t, \
                                    const T*);                                                                \
  template void shrink_block_avx2<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int);   \
  template void expand_block_avx2<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int, float);
MOA_INSTANTIATE(float)
MOA_INSTANTIATE(c10::BFloat16)
MOA_INSTANTIATE(c10::Half)
#undef MOA_INSTANTIATE

}  // namespace moa::cpu
