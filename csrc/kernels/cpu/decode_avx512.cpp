// AVX-512 decode kernels (see decode_avx512.h). Compiled with per-function target
// attributes, so the rest of the build stays portable.
//
// shrink: a tile of RB rows of A times NT tokens keeps RB * NT accumulators in
//   registers (8 to 16 independent FMA chains) and loads each x chunk once per tile.
// expand: rows of B are short (r), so 16 rows' dot products are reduced together by
//   one shuffle tree (reduce16) instead of 16 horizontal sums.
#include "kernels/cpu/decode_avx512.h"

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOA_HAVE_AVX512_DECODE 1
#define MOA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define MOA_HAVE_AVX512_DECODE 0
#endif

namespace moa::cpu {

#if MOA_HAVE_AVX512_DECODE
namespace {

constexpr __mmask16 kAll = 0xffff;

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? kAll : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

MOA_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MOA_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
MOA_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

MOA_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
MOA_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // Round to nearest even; NaN stays a (quiet) NaN.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
MOA_AVX512 inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Scalar float -> T with round to nearest even (c10's conversions).
template <typename T>
inline T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);
  }
}

// ---------------------------------------------------------------------------
// shrink

// acc[rr][q] += A[rr * k + i, +16) * xs[q][i, +16) under mask m.
template <int RB, int NT, typename T>
MOA_AVX512 inline __attribute__((always_inline)) void dot_step(const T* A, int64_t k,
                                                               const T* const* xs, int64_t i,
                                                               __mmask16 m, __m512 (&acc)[RB][NT]) {
  __m512 xv[NT];
  for (int q = 0; q < NT; ++q) xv[q] = load16(xs[q] + i, m);
  for (int rr = 0; rr < RB; ++rr) {
    const __m512 av = load16(A + rr * k + i, m);
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_fmadd_ps(av, xv[q], acc[rr][q]);
  }
}

// out[q * RB + rr] = dot(A[rr * k, ...], xs[q]) for rr < RB, q < NT.
template <int RB, int NT, typename T>
MOA_AVX512 inline void dot_tile(const T* A, int64_t k, const T* const* xs, float* out) {
  __m512 acc[RB][NT];
  for (int rr = 0; rr < RB; ++rr)
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) dot_step<RB, NT>(A, k, xs, i, kAll, acc);
  if (i < k) dot_step<RB, NT>(A, k, xs, i, first_n(k - i), acc);
  for (int rr = 0; rr < RB; ++rr)
    for (int q = 0; q < NT; ++q) out[q * RB + rr] = _mm512_reduce_add_ps(acc[rr][q]);
}

template <int RB, int NT, typename T>
MOA_AVX512 void shrink_rows(const T* A, int64_t k, int64_t row0, int64_t row1,
                            const T* const* xs, T* const* vs) {
  float out[RB * NT];
  int64_t j = row0;
  for (; j + RB <= row1; j += RB) {
    dot_tile<RB, NT>(A + j * k, k, xs, out);
    for (int q = 0; q < NT; ++q)
      for (int rr = 0; rr < RB; ++rr) vs[q][j + rr] = from_float<T>(out[q * RB + rr]);
  }
  for (; j < row1; ++j) {
    dot_tile<1, NT>(A + j * k, k, xs, out);
    for (int q = 0; q < NT; ++q) vs[q][j] = from_float<T>(out[q]);
  }
}

// ---------------------------------------------------------------------------
// expand

// Returns s with s[i] = sum of the 16 lanes of p[i], for i < 16.
MOA_AVX512 inline __m512 reduce16(const __m512 (&p)[16]) {
  __m512 q[8], w[4], z[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    q[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]),
                         _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per lane: the lane sums of 4 consecutive rows
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 2; ++i) {  // add lane pairs
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Rows [o, o + n) (n <= 16) for one token; C16 > 0 fixes the chunk count at compile
// time (unrolled), C16 == 0 reads it from `chunks`.
template <int C16, typename T>
MOA_AVX512 inline void expand_16_rows(const T* B, int64_t r, int64_t o, int64_t n,
                                      int64_t chunks, const __mmask16* masks, const __m512* v,
                                      T* y, const __m512 scale) {
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
MOA_AVX512 void expand_rows(const T* B, int64_t r, int64_t row0, int64_t row1,
                            const T* const* vs, T* const* ys, int nt, float scale) {
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
void shrink_block_avx512(const T* A, int64_t k, int64_t row0, int64_t row1, const T* const* xs,
                         T* const* vs, int nt) {
  switch (nt) {  // 8 to 16 accumulator chains per tile
    case 1: return shrink_rows<8, 1>(A, k, row0, row1, xs, vs);
    case 2: return shrink_rows<8, 2>(A, k, row0, row1, xs, vs);
    case 3: return shrink_rows<4, 3>(A, k, row0, row1, xs, vs);
    default: return shrink_rows<4, 4>(A, k, row0, row1, xs, vs);
  }
}

template <typename T>
void expand_block_avx512(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs,
                         T* const* ys, int nt, float scale) {
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
void shrink_block_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int) {}

template <typename T>
void expand_block_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int,
                         float) {}

#endif

#define MOA_INSTANTIATE(T)                                                                      \
  template void shrink_block_avx512<T>(const T*, int64_t, int64_t, int64_t, const T* const*,    \
                                       T* const*, int);                                         \
  template void expand_block_avx512<T>(const T*, int64_t, int64_t, int64_t, const T* const*,    \
                                       T* const*, int, float);
MOA_INSTANTIATE(float)
MOA_INSTANTIATE(c10::BFloat16)
MOA_INSTANTIATE(c10::Half)
#undef MOA_INSTANTIATE

}  // namespace moa::cpu
