// AVX2 helpers shared by the CPU kernels (CPUs with AVX2, FMA and F16C but no AVX-512, such
// as AMD Zen 2 / Zen 3 and Intel before Skylake-SP): loads of float / bfloat16 / half rows
// widened to float, horizontal sums, and the kernel target attribute. Include only from
// kernel sources; everything is gated by MOA_HAVE_AVX2, and every function that uses these
// instructions is reached only after a run-time check of the CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOA_HAVE_AVX2 1
#define MOA_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MOA_HAVE_AVX2 0
#endif

namespace moa::cpu {

// True when this CPU has AVX2, FMA and F16C (and the build has the kernels).
bool avx2_available();

#if MOA_HAVE_AVX2
namespace avx2 {

// 8 elements at p, widened to float.
MOA_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOA_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MOA_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The first n (< 8) elements at p, zeros after them; reads nothing past p + n.
template <typename T>
MOA_AVX2 inline __m256 load8_tail(const T* p, int64_t n) {
  T buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(T));
  return load8(buf);
}

MOA_AVX2 inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Returns s with s[i] = sum of the 8 lanes of p[i], for i < 8.
MOA_AVX2 inline __m256 reduce8(const __m256 (&p)[8]) {
  const __m256 t0 = _mm256_hadd_ps(p[0], p[1]), t1 = _mm256_hadd_ps(p[2], p[3]);
  const __m256 t2 = _mm256_hadd_ps(p[4], p[5]), t3 = _mm256_hadd_ps(p[6], p[7]);
  // Per 128-bit half: [p0, p1, p2, p3] (u0) and [p4 .. p7] (u1), each lane one half's sum.
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// v rounded to bfloat16, to nearest even, in the upper 16 bits of each lane (the lower ones
// are left over); NaN stays a (quiet) NaN.
MOA_AVX2 inline __m256i bf16_rounded(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
}

// 8 floats stored to p as T, rounded to nearest even.
MOA_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MOA_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i hi = _mm256_srli_epi32(bf16_rounded(v), 16);  // 8 x 16 bits, zero-extended
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
MOA_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Rounds v through T and back (what storing to T and reloading gives), in registers.
template <typename T>
MOA_AVX2 inline __m256 round_through(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_rounded(v), _mm256_set1_epi32(int(0xffff0000u))));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// exp(x) for 8 floats, as avx512::exp16: 2^n * P(r), x = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial (Cephes expf), within 2 ulp; 0 for x < -87.3 (also -inf), and the
// clamp at 88.72 gives a finite value there (callers that need inf beyond it mask it in).
MOA_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // p * 2^n as p * 2^h * 2^(n - h), h = n / 2: each factor a normal float for n in [-126, 128].
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(_mm256_mul_ps(p, f1), f2));
}

}  // namespace avx2
#endif

}  // namespace moa::cpu
