// AVX-512 decode kernels (see decode_avx512.h). Compiled with per-function target
// attributes, so the rest of the build stays portable.
//
// shrink: a tile of RB rows of A times NT tokens keeps RB * NT accumulators in
//   registers (8 to 16 independent FMA chains) and loads each x chunk once per tile.
// expand: rows of B are short (r), so 16 rows' dot products are reduced together by
//   one shuffle tree (reduce16) instead of 16 horizontal sums.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no Python, no model knowledge;
// CPU kernels may use ATen's BLAS and at::parallel_for.
#include "kernels/cpu/decode_avx512.h"

#include <algorithm>
#include <type_traits>

#include "kernels/cpu/avx512_util.h"

namespace moa::cpu {

#if MOA_HAVE_AVX512
namespace {
using namespace avx512;

// ---------------------------------------------------------------------------
// shrink

// out[q * RB + rr] = dot(A[rr * k, ...], xs[q]) for rr < RB, q < NT.
// One loop with a mask per 16-chunk (all ones but the last): the accumulators stay in
// registers. (A separate tail step taking them by reference made GCC keep them in
// memory, storing all RB * NT of them every iteration: 3x slower.)
template <int RB, int NT, typename T>
MOA_AVX512 inline void dot_tile(const T* A, int64_t k, const T* const* xs, float* out) {
  __m512 acc[RB][NT];
  const T* x[NT];
#pragma GCC unroll 4
  for (int q = 0; q < NT; ++q) x[q] = xs[q];
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 m = first_n(k - i);
    __m512 xv[NT];
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) xv[q] = load16(x[q] + i, m);
#pragma GCC unroll 8
    for (int rr = 0; rr < RB; ++rr) {
      const __m512 av = load16(A + rr * k + i, m);
#pragma GCC unroll 4
      for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_fmadd_ps(av, xv[q], acc[rr][q]);
    }
  }
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) out[q * RB + rr] = _mm512_reduce_add_ps(acc[rr][q]);
}

// ys[q][j + rr] = dot(W row j + rr, xs[q]) (+ bias[j + rr]), rounded to T, for rr < RB, q < NT.
template <int RB, int NT, typename T>
MOA_AVX512 inline void tile_store(const T* W, int64_t k, int64_t j, const T* const* xs, T* const* ys, const T* bias) {
  float out[RB * NT];
  dot_tile<RB, NT>(W + j * k, k, xs, out);
  for (int q = 0; q < NT; ++q)
    for (int rr = 0; rr < RB; ++rr) {
      const float b = bias != nullptr ? static_cast<float>(bias[j + rr]) : 0.0f;
      ys[q][j + rr] = from_float<T>(out[q * RB + rr] + b);
    }
}

// One block of RB rows of W against all m tokens, 4 tokens a tile: the block stays in
// L1 while the token groups pass over it.
template <int RB, typename T>
MOA_AVX512 inline void tile_tokens(const T* W, int64_t k, int64_t j, const T* const* xs, T* const* ys, int64_t m,
                                   const T* bias) {
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) tile_store<RB, 4>(W, k, j, xs + q, ys + q, bias);
  switch (m - q) {
    case 1: return tile_store<RB, 1>(W, k, j, xs + q, ys + q, bias);
    case 2: return tile_store<RB, 2>(W, k, j, xs + q, ys + q, bias);
    case 3: return tile_store<RB, 3>(W, k, j, xs + q, ys + q, bias);
    default: return;
  }
}

template <int RB, typename T>
MOA_AVX512 void rows_times_tokens(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys,
                                  int64_t m, const T* bias) {
  int64_t j = row0;
  for (; j + RB <= row1; j += RB) tile_tokens<RB>(W, k, j, xs, ys, m, bias);
  for (; j < row1; ++j) tile_tokens<1>(W, k, j, xs, ys, m, bias);
}

// ---------------------------------------------------------------------------
// expand

// Rows [o, o + n) (n <= 16) for one token; C16 > 0 fixes the chunk count at compile
// time (unrolled), C16 == 0 reads it from `chunks`.
template <int C16, typename T>
MOA_AVX512 inline void expand_16_rows(const T* B, int64_t r, int64_t o, int64_t n, int64_t chunks,
                                      const __mmask16* masks, const __m512* v, T* y, const __m512 scale) {
  const int64_t C = C16 > 0 ? C16 : chunks;
  __m512 p[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    __m512 acc = _mm512_setzero_ps();
    if (i < n) {
      const T* b = B + (o + i) * r;
#pragma GCC unroll 4
      for (int64_t c = 0; c < C; ++c) acc = _mm512_fmadd_ps(load16(b + 16 * c, masks[c]), v[c], acc);
    }
    p[i] = acc;
  }
  const __mmask16 m = first_n(n);
  store16(y + o, _mm512_fmadd_ps(reduce16(p), scale, load16(y + o, m)), m);
}

template <int C16, typename T>
MOA_AVX512 void expand_rows(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs, T* const* ys, int nt,
                            float scale) {
  const int64_t chunks = (r + 15) / 16;
  __mmask16 masks[kDecodeAvx512MaxRank / 16];
  for (int64_t c = 0; c < chunks; ++c) masks[c] = first_n(r - 16 * c);
  const __m512 s = _mm512_set1_ps(scale);
  for (int q = 0; q < nt; ++q) {
    __m512 v[kDecodeAvx512MaxRank / 16];  // token q's V row in float, 16 ranks a register
    for (int64_t c = 0; c < chunks; ++c) v[c] = load16(vs[q] + 16 * c, masks[c]);
    int64_t o = row0;
    for (; o + 16 <= row1; o += 16) expand_16_rows<C16>(B, r, o, 16, chunks, masks, v, ys[q], s);
    if (o < row1) expand_16_rows<C16>(B, r, o, row1 - o, chunks, masks, v, ys[q], s);
  }
}

}  // namespace

bool decode_avx512_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

template <typename T>
void linear_rows_avx512(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys, int64_t m,
                        const T* bias) {
  // 8 to 16 accumulator chains per tile: 8 rows for one or two tokens, else 4.
  if (m <= 2) return rows_times_tokens<8>(W, k, row0, row1, xs, ys, m, bias);
  return rows_times_tokens<4>(W, k, row0, row1, xs, ys, m, bias);
}

template <typename T>
void shrink_block_avx512(const T* A, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* vs, int nt) {
  linear_rows_avx512(A, k, row0, row1, xs, vs, nt, static_cast<const T*>(nullptr));
}

template <typename T>
void expand_block_avx512(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs, T* const* ys, int nt,
                         float scale) {
  switch ((r + 15) / 16) {  // unrolled for ranks up to 64
    case 1: return expand_rows<1>(B, r, row0, row1, vs, ys, nt, scale);
    case 2: return expand_rows<2>(B, r, row0, row1, vs, ys, nt, scale);
    case 3: return expand_rows<3>(B, r, row0, row1, vs, ys, nt, scale);
    case 4: return expand_rows<4>(B, r, row0, row1, vs, ys, nt, scale);
    default: return expand_rows<0>(B, r, row0, row1, vs, ys, nt, scale);
  }
}

#else  // no AVX-512 kernels in this build

bool decode_avx512_available() { return false; }

template <typename T>
void linear_rows_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int64_t, const T*) {}

template <typename T>
void shrink_block_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int) {}

template <typename T>
void expand_block_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int, float) {}

#endif

#define MOA_INSTANTIATE(T)                                                                                      \
  template void linear_rows_avx512<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int64_t, \
                                      const T*);                                                                \
  template void shrink_block_avx512<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int);   \
  template void expand_block_avx512<T>(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int, float);
MOA_INSTANTIATE(float)
MOA_INSTANTIATE(c10::BFloat16)
MOA_INSTANTIATE(c10::Half)
#undef MOA_INSTANTIATE

}  // namespace moa::cpu
