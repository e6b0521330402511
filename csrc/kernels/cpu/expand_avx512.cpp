// AVX-512 expand kernel (see expand_avx512.h). Compiled with per-function target
// attributes, so the rest of the build stays portable.
#include "kernels/cpu/expand_avx512.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOA_HAVE_AVX512_EXPAND 1
#define MOA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define MOA_HAVE_AVX512_EXPAND 0
#endif

namespace moa::cpu {

#if MOA_HAVE_AVX512_EXPAND
namespace {

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

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// Returns s with s[i] = sum of the 16 lanes of p[i], for i < 16.
MOA_AVX512 inline __m512 reduce16(__m512 (&p)[16]) {
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

template <typename T>
MOA_AVX512 void expand_block(const T* B, int64_t r, int64_t row0, int64_t row1,
                             const T* const* vs, T* const* ys, int nt, float scale) {
  const int64_t chunks = (r + 15) / 16;
  const __mmask16 tail = first_n(r - (chunks - 1) * 16);
  __m512 v[4][kExpandAvx512MaxRank / 16];  // v[q] as float, 16 ranks a register
  for (int q = 0; q < nt; ++q) {
    for (int64_t c = 0; c < chunks; ++c) {
      v[q][c] = load16(vs[q] + 16 * c, c == chunks - 1 ? tail : __mmask16(0xffff));
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t o = row0; o < row1; o += 16) {
    const int64_t n = std::min<int64_t>(16, row1 - o);
    for (int q = 0; q < nt; ++q) {
      __m512 p[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m512 acc = _mm512_setzero_ps();
        if (i < n) {
          const T* b = B + (o + i) * r;
          for (int64_t c = 0; c < chunks; ++c) {
            acc = _mm512_fmadd_ps(load16(b + 16 * c, c == chunks - 1 ? tail : __mmask16(0xffff)),
                                  v[q][c], acc);
          }
        }
        p[i] = acc;
      }
      const __mmask16 m = first_n(n);
      const __m512 y = load16(ys[q] + o, m);
      store16(ys[q] + o, _mm512_fmadd_ps(reduce16(p), s, y), m);
    }
  }
}

}  // namespace

bool expand_avx512_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

template <typename T>
void expand_block_avx512(const T* B, int64_t r, int64_t row0, int64_t row1, const T* const* vs,
                         T* const* ys, int nt, float scale) {
  expand_block(B, r, row0, row1, vs, ys, nt, scale);
}

#else  // no AVX-512 kernel in this build

bool expand_avx512_available() { return false; }

template <typename T>
void expand_block_avx512(const T*, int64_t, int64_t, int64_t, const T* const*, T* const*, int,
                         float) {}

#endif

template void expand_block_avx512<float>(const float*, int64_t, int64_t, int64_t,
                                         const float* const*, float* const*, int, float);
template void expand_block_avx512<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t,
                                                 const c10::BFloat16* const*,
                                                 c10::BFloat16* const*, int, float);
template void expand_block_avx512<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t,
                                             const c10::Half* const*, c10::Half* const*, int,
                                             float);

}  // namespace moa::cpu
