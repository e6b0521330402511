// Weight-only quantized linear on CPU (see quant.h).
//
// The portable dequantizers follow the gguf package's reference code block by block
// (gguf/quants.py), in the same float operations, so that tests can compare them to it.
// The AVX-512 ones take 16 elements per instruction; the dot products reuse the float
// decode kernel (decode_avx512.h) on a tile of 16 dequantized rows kept in L1.
#include "kernels/cpu/quant.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/avx2_util.h"
#include "kernels/cpu/avx512_util.h"
#include "kernels/cpu/decode_avx512.h"
#include "moa/errors.h"

namespace moa::cpu {
namespace {

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------
// Portable dequantizers: one block of `type` into out.

void block_q8_0(const uint8_t* b, float* out) {
  const float d = fp16(b);
  const auto* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(qs[i]);
}

void block_q4_0(const uint8_t* b, float* out) {
  const float d = fp16(b);
  const uint8_t* qs = b + 2;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * static_cast<float>(static_cast<int>(qs[i] & 15) - 8);
    out[i + 16] = d * static_cast<float>(static_cast<int>(qs[i] >> 4) - 8);
  }
}

void block_q4_1(const uint8_t* b, float* out) {
  const float d = fp16(b), m = fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * static_cast<float>(qs[i] & 15) + m;
    out[i + 16] = d * static_cast<float>(qs[i] >> 4) + m;
  }
}

// The K-quants' 12 bytes of 6-bit scales and mins: 8 (scale, min) pairs.
void k_scale_min(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

void block_q4_k(const uint8_t* b, float* out) {
  const float d = fp16(b), dmin = fp16(b + 2);
  uint8_t sc[8], mn[8];
  k_scale_min(b + 4, sc, mn);
  const uint8_t* qs = b + 16;
  for (int g = 0; g < 4; ++g)
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * g + h;
      const float ds = d * static_cast<float>(sc[j]), dm = dmin * static_cast<float>(mn[j]);
      for (int l = 0; l < 32; ++l) out[32 * j + l] = ds * static_cast<float>((qs[32 * g + l] >> (4 * h)) & 15) - dm;
    }
}

void block_q5_k(const uint8_t* b, float* out) {
  const float d = fp16(b), dmin = fp16(b + 2);
  uint8_t sc[8], mn[8];
  k_scale_min(b + 4, sc, mn);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int g = 0; g < 4; ++g)
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * g + h;
      const float ds = d * static_cast<float>(sc[j]), dm = dmin * static_cast<float>(mn[j]);
      for (int l = 0; l < 32; ++l) {
        const int q = ((qs[32 * g + l] >> (4 * h)) & 15) | (((qh[l] >> j) & 1) << 4);
        out[32 * j + l] = ds * static_cast<float>(q) - dm;
      }
    }
}

void block_q6_k(const uint8_t* b, float* out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16(b + 208);
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 128; ++r) {
      const int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
      const int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
      const int e = 128 * h + r;
      out[e] = d * static_cast<float>(scales[e / 16]) * static_cast<float>((lo | (hi << 4)) - 32);
    }
}

void dequantize_row_portable(QType type, const uint8_t* row, int64_t k, float* out) {
  switch (type) {
    case QType::F32: std::memcpy(out, row, static_cast<size_t>(k) * 4); return;
    case QType::F16:
      for (int64_t i = 0; i < k; ++i) out[i] = fp16(row + 2 * i);
      return;
    case QType::BF16:
      for (int64_t i = 0; i < k; ++i) out[i] = bf16(row + 2 * i);
      return;
    default: break;
  }
  void (*block)(const uint8_t*, float*) = nullptr;
  switch (type) {
    case QType::Q8_0: block = block_q8_0; break;
    case QType::Q4_0: block = block_q4_0; break;
    case QType::Q4_1: block = block_q4_1; break;
    case QType::Q4_K: block = block_q4_k; break;
    case QType::Q5_K: block = block_q5_k; break;
    case QType::Q6_K: block = block_q6_k; break;
    default: throw_error<InvalidArgument>("dequantize: unsupported type id ", static_cast<uint32_t>(type));
  }
  const QTypeInfo info = *qtype_info(static_cast<uint32_t>(type));
  const int64_t elems = info.block_elems, bytes = info.block_bytes;
  for (int64_t b = 0; b < k / elems; ++b) block(row + b * bytes, out + b * elems);
}

// ---------------------------------------------------------------------------
// AVX-512 dequantizers: 32-element blocks, 16 lanes at a time.

#if MOA_HAVE_AVX512
using namespace avx512;

// An fp16 scale field broadcast to 16 floats (vcvtph2ps, AVX-512F).
MOA_AVX512 inline __m512 fp16x16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
}

// 16 bytes of nibbles -> (low nibbles, high nibbles) as floats.
MOA_AVX512 inline void nibbles(const uint8_t* qs, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

MOA_AVX512 void row_avx512(QType type, const uint8_t* row, int64_t k, float* out) {
  switch (type) {
    case QType::Q8_0:
      for (int64_t b = 0; b < k / 32; ++b, row += 34, out += 32) {
        const __m512 d = fp16x16(row);
        const __m128i* qs = reinterpret_cast<const __m128i*>(row + 2);
        _mm512_storeu_ps(out, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs)))));
        _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs + 1)))));
      }
      return;
    case QType::Q4_0:
      for (int64_t b = 0; b < k / 32; ++b, row += 18, out += 32) {
        const __m512 d = fp16x16(row), eight = _mm512_set1_ps(8.0f);
        __m512 lo, hi;
        nibbles(row + 2, lo, hi);
        _mm512_storeu_ps(out, _mm512_mul_ps(d, _mm512_sub_ps(lo, eight)));
        _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, _mm512_sub_ps(hi, eight)));
      }
      return;
    case QType::Q4_1:
      for (int64_t b = 0; b < k / 32; ++b, row += 20, out += 32) {
        const __m512 d = fp16x16(row), m = fp16x16(row + 2);
        __m512 lo, hi;
        nibbles(row + 4, lo, hi);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(d, lo, m));
        _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(d, hi, m));
      }
      return;
    case QType::F16:
    case QType::BF16: {
      const auto* src = reinterpret_cast<const c10::Half*>(row);
      const auto* srcb = reinterpret_cast<const c10::BFloat16*>(row);
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 msk = first_n(k - i);
        store16(out + i, type == QType::F16 ? load16(src + i, msk) : load16(srcb + i, msk), msk);
      }
      return;
    }
    default: dequantize_row_portable(type, row, k, out);
  }
}
// One 32-element block of row data as two float vectors (elements 0-15, 16-31).
template <QType Q>
MOA_AVX512 inline void block32(const uint8_t* b, __m512& lo, __m512& hi) {
  if constexpr (Q == QType::Q8_0) {
    const __m512 d = fp16x16(b);
    const __m128i* qs = reinterpret_cast<const __m128i*>(b + 2);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs + 1))));
  } else if constexpr (Q == QType::Q4_0) {
    const __m512 d = fp16x16(b), m = _mm512_mul_ps(_mm512_set1_ps(-8.0f), fp16x16(b));
    __m512 ql, qh;
    nibbles(b + 2, ql, qh);
    lo = _mm512_fmadd_ps(d, ql, m);
    hi = _mm512_fmadd_ps(d, qh, m);
  } else {
    const __m512 d = fp16x16(b), m = fp16x16(b + 2);
    __m512 ql, qh;
    nibbles(b + 4, ql, qh);
    lo = _mm512_fmadd_ps(d, ql, m);
    hi = _mm512_fmadd_ps(d, qh, m);
  }
}

// ys[q][j + rr] = dot(row j + rr, xs[q]) (+ bias) for rr < RB, q < NT: each block is
// dequantized in registers and used by all NT tokens, never stored.
template <QType Q, int RB, int NT>
MOA_AVX512 inline void fused_tile(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j, const float* const* xs,
                                  float* const* ys, const float* bias) {
  constexpr int64_t kBytes = Q == QType::Q8_0 ? 34 : Q == QType::Q4_0 ? 18 : 20;
  __m512 acc[RB][NT];
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_setzero_ps();
  const uint8_t* rows = W + j * row_bytes;
  for (int64_t b = 0; b < k / 32; ++b) {
    __m512 x0[NT], x1[NT];
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) {
      x0[q] = _mm512_loadu_ps(xs[q] + 32 * b);
      x1[q] = _mm512_loadu_ps(xs[q] + 32 * b + 16);
    }
#pragma GCC unroll 8
    for (int rr = 0; rr < RB; ++rr) {
      __m512 lo, hi;
      block32<Q>(rows + rr * row_bytes + b * kBytes, lo, hi);
#pragma GCC unroll 4
      for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_fmadd_ps(hi, x1[q], _mm512_fmadd_ps(lo, x0[q], acc[rr][q]));
    }
  }
  for (int q = 0; q < NT; ++q)
    for (int rr = 0; rr < RB; ++rr)
      ys[q][j + rr] = _mm512_reduce_add_ps(acc[rr][q]) + (bias != nullptr ? bias[j + rr] : 0.0f);
}

template <QType Q, int RB>
MOA_AVX512 void fused_rows(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1,
                           const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  int64_t j = j0;
  auto tokens = [&](auto rb, int64_t jj) {
    constexpr int R = decltype(rb)::value;
    int64_t q = 0;
    for (; q + 4 <= m; q += 4) fused_tile<Q, R, 4>(W, row_bytes, k, jj, xs + q, ys + q, bias);
    switch (m - q) {
      case 1: fused_tile<Q, R, 1>(W, row_bytes, k, jj, xs + q, ys + q, bias); break;
      case 2: fused_tile<Q, R, 2>(W, row_bytes, k, jj, xs + q, ys + q, bias); break;
      case 3: fused_tile<Q, R, 3>(W, row_bytes, k, jj, xs + q, ys + q, bias); break;
      default: break;
    }
  };
  // Rows of a quantized matrix are short (360 bytes for Q4_1 at k = 576), and RB of them
  // read side by side are RB short streams that the hardware prefetcher starts late: the
  // tile two ahead goes into L1 now (on an AMD EPYC, batch-1 decode +35%).
  constexpr int64_t kAhead = 2;
  const int64_t tile_bytes = RB * row_bytes;
  for (; j + RB <= j1; j += RB) {
    if (j + (kAhead + 1) * RB <= j1) {
      const char* ahead = reinterpret_cast<const char*>(W + (j + kAhead * RB) * row_bytes);
      for (int64_t b = 0; b < tile_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    tokens(std::integral_constant<int, RB>{}, j);
  }
  for (; j < j1; ++j) tokens(std::integral_constant<int, 1>{}, j);
}

// One token: rows one at a time, so that the matrix is read as one sequential stream
// (tiles of rows read side by side are several short streams, which the hardware
// prefetcher follows late), with four accumulators (two blocks per step) to cover the
// FMA latency, and a software prefetch kPrefetch bytes ahead of the reads.
template <QType Q>
MOA_AVX512 void fused_rows_one(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1, const float* x,
                               float* y, const float* bias) {
  constexpr int64_t kBytes = Q == QType::Q8_0 ? 34 : Q == QType::Q4_0 ? 18 : 20;
  // Ahead by 512 bytes (a Q8_0 row of k = 576 is 612): on a 2-core AMD EPYC a 71 MB Q8_0
  // matrix read at 9 GB/s per core with the 4-row tiles, 14 GB/s so (256-4096 tried).
  constexpr int64_t kPrefetch = 512;
  const int64_t nb = k / 32;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = W + j * row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBytes + kPrefetch), _MM_HINT_T0);
      __m512 lo, hi;
      block32<Q>(row + b * kBytes, lo, hi);
      a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * b), a0);
      a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * b + 16), a1);
      block32<Q>(row + (b + 1) * kBytes, lo, hi);
      a2 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * b + 32), a2);
      a3 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * b + 48), a3);
    }
    if (b < nb) {
      __m512 lo, hi;
      block32<Q>(row + b * kBytes, lo, hi);
      a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * b), a0);
      a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * b + 16), a1);
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    y[j] = _mm512_reduce_add_ps(sum) + (bias != nullptr ? bias[j] : 0.0f);
  }
}

// The fused kernels take few tokens (they dequantize once per 4 tokens); true when used.
bool fused_avx512(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                  const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  if (m > 4) return false;
  if (m == 1) {
    switch (type) {
      case QType::Q8_0: fused_rows_one<QType::Q8_0>(W, row_bytes, k, row0, row1, xs[0], ys[0], bias); return true;
      case QType::Q4_0: fused_rows_one<QType::Q4_0>(W, row_bytes, k, row0, row1, xs[0], ys[0], bias); return true;
      case QType::Q4_1: fused_rows_one<QType::Q4_1>(W, row_bytes, k, row0, row1, xs[0], ys[0], bias); return true;
      default: break;
    }
  }
  switch (type) {
    case QType::Q8_0: fused_rows<QType::Q8_0, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_0: fused_rows<QType::Q4_0, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_1: fused_rows<QType::Q4_1, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------
// The int8 path (AVX512-VNNI on 256-bit vectors): one block of 32 weights is one ymm of
// bytes, and vpdpbusd multiplies it with a token's 32 int8 activations in one instruction.

#define MOA_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

MOA_VNNI inline float fp16_scalar(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// A Q4 block's 16 bytes of nibbles as 32 bytes 0..15 in element order (lo nibbles, then hi).
MOA_VNNI inline __m256i nibbles_u8(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

MOA_VNNI inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// ys[q0 + t][j + rr] for rr < RB, t < NT: each weight block is unpacked once into bytes and
// used by all NT tokens.
template <QType Q, int RB, int NT>
MOA_VNNI inline void int8_tile(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j, const Int8Rows& a, int64_t q0,
                               float* const* ys, const float* bias) {
  constexpr int64_t kBytes = Q == QType::Q8_0 ? 34 : Q == QType::Q4_0 ? 18 : 20;
  const int64_t nb = k / 32;
  __m256 acc[RB][NT];
  float extra[RB][NT];  // Q4_0: -8 d_w d_x sum(q_x); Q4_1: m_w sum(x)
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[rr][t] = _mm256_setzero_ps(), extra[rr][t] = 0.0f;
  const uint8_t* rows = W + j * row_bytes;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i qx[NT];
    float dx[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      qx[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + (q0 + t) * k + 32 * b));
      dx[t] = a.d[(q0 + t) * nb + b];
    }
#pragma GCC unroll 8
    for (int rr = 0; rr < RB; ++rr) {
      const uint8_t* blk = rows + rr * row_bytes + b * kBytes;
      const float dw = fp16_scalar(blk);
      if constexpr (Q == QType::Q8_0) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        const __m256i aw = _mm256_abs_epi8(w);  // |w| as unsigned (|-128| = 128); the sign moves to x
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const __m256i dot = _mm256_dpbusd_epi32(zero, aw, _mm256_sign_epi8(qx[t], w));
          acc[rr][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * dx[t]), acc[rr][t]);
        }
      } else {
        const __m256i w = nibbles_u8(blk + (Q == QType::Q4_0 ? 2 : 4));
        const float mw = Q == QType::Q4_1 ? fp16_scalar(blk + 2) : 0.0f;
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const __m256i dot = _mm256_dpbusd_epi32(zero, w, qx[t]);
          const float s = dw * dx[t];
          acc[rr][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s), acc[rr][t]);
          if constexpr (Q == QType::Q4_0)
            extra[rr][t] -= 8.0f * s * static_cast<float>(a.qsum[(q0 + t) * nb + b]);
          else
            extra[rr][t] += mw * a.xsum[(q0 + t) * nb + b];
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int rr = 0; rr < RB; ++rr)
      ys[q0 + t][j + rr] = hsum8(acc[rr][t]) + extra[rr][t] + (bias != nullptr ? bias[j + rr] : 0.0f);
}

template <QType Q>
MOA_VNNI void int8_rows(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1, const Int8Rows& a,
                        float* const* ys, const float* bias) {
  constexpr int RB = 4;
  auto tokens = [&](auto rb, int64_t jj) {
    constexpr int R = decltype(rb)::value;
    int64_t q = 0;
    for (; q + 4 <= a.m; q += 4) int8_tile<Q, R, 4>(W, row_bytes, k, jj, a, q, ys, bias);
    switch (a.m - q) {
      case 1: int8_tile<Q, R, 1>(W, row_bytes, k, jj, a, q, ys, bias); break;
      case 2: int8_tile<Q, R, 2>(W, row_bytes, k, jj, a, q, ys, bias); break;
      case 3: int8_tile<Q, R, 3>(W, row_bytes, k, jj, a, q, ys, bias); break;
      default: break;
    }
  };
  int64_t j = j0;
  // Rows of a quantized matrix are short (360 bytes for Q4_1 at k = 576), and RB of them
  // read side by side are RB short streams that the hardware prefetcher starts late: the
  // tile two ahead goes into L1 now (on an AMD EPYC, batch-1 decode +35%).
  constexpr int64_t kAhead = 2;
  const int64_t tile_bytes = RB * row_bytes;
  for (; j + RB <= j1; j += RB) {
    if (j + (kAhead + 1) * RB <= j1) {
      const char* ahead = reinterpret_cast<const char*>(W + (j + kAhead * RB) * row_bytes);
      for (int64_t b = 0; b < tile_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    tokens(std::integral_constant<int, RB>{}, j);
  }
  for (; j < j1; ++j) tokens(std::integral_constant<int, 1>{}, j);
}

// Round half away from zero, as roundf and the gguf package's Q8_0 quantizer.
MOA_VNNI inline __m512i round_away(__m512 v, __m512 scale) {
  const __m512 s = _mm512_mul_ps(v, scale);
  const __m512 h = _mm512_or_ps(_mm512_set1_ps(0.5f), _mm512_and_ps(_mm512_set1_ps(-0.0f), s));
  return _mm512_cvttps_epi32(_mm512_add_ps(s, h));
}

MOA_VNNI void quantize_activations_vnni(const float* const* xs, int64_t m, int64_t k, Int8Rows& out) {
  const int64_t nb = k / 32;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t q = 0; q < m; ++q)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = xs[q] + 32 * b;
      const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
      const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i qlo = round_away(lo, vid), qhi = round_away(hi, vid);
      int8_t* dst = out.q.data() + q * k + 32 * b;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(qhi));
      out.d[q * nb + b] = d;
      out.qsum[q * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
      out.xsum[q * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}
#endif

#if MOA_HAVE_AVX512
// ---------------------------------------------------------------------------
// AVX2 kernels (AVX2, FMA, F16C; CPUs without AVX-512): the 32-element block types and the
// float types, 8 lanes at a time, with the same float operations as the AVX-512 ones. (Under
// MOA_HAVE_AVX512, which means an x86-64 GCC / Clang build: it emits either by target attribute.)

MOA_AVX2 inline __m256 fp16x8(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
}

// One 32-element block as four vectors of 8 floats, in element order.
template <QType Q>
MOA_AVX2 inline void block32_avx2(const uint8_t* b, __m256 v[4]) {
  if constexpr (Q == QType::Q8_0) {
    const __m256 d = fp16x8(b);
    for (int c = 0; c < 4; ++c) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * c));
      v[c] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  } else {
    const __m256 d = fp16x8(b);
    const __m256 m = Q == QType::Q4_0 ? _mm256_mul_ps(_mm256_set1_ps(-8.0f), d) : fp16x8(b + 2);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == QType::Q4_0 ? 2 : 4)));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int c = 0; c < 4; ++c) v[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[c])), m);
  }
}

MOA_AVX2 void row_avx2(QType type, const uint8_t* row, int64_t k, float* out) {
  __m256 v[4];
  switch (type) {
    case QType::Q8_0:
    case QType::Q4_0:
    case QType::Q4_1: {
      const int64_t bytes = type == QType::Q8_0 ? 34 : type == QType::Q4_0 ? 18 : 20;
      for (int64_t b = 0; b < k / 32; ++b, row += bytes, out += 32) {
        if (type == QType::Q8_0)
          block32_avx2<QType::Q8_0>(row, v);
        else if (type == QType::Q4_0)
          block32_avx2<QType::Q4_0>(row, v);
        else
          block32_avx2<QType::Q4_1>(row, v);
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + 8 * c, v[c]);
      }
      return;
    }
    case QType::F16: {
      int64_t i = 0;
      for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i))));
      for (; i < k; ++i) out[i] = fp16(row + 2 * i);
      return;
    }
    case QType::BF16: {
      int64_t i = 0;
      for (; i + 8 <= k; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
      for (; i < k; ++i) out[i] = bf16(row + 2 * i);
      return;
    }
    default: dequantize_row_portable(type, row, k, out);
  }
}

// The scales of a 32-element block, broadcast: d, and m (Q4_1's minimum; Q4_0's -8 d). One
// 32-bit broadcast load and one conversion give [d, m, d, m, ...] (Q8_0 and Q4_0 read d and
// the first two quants, whose half is never used), then one permute per scale.
template <QType Q>
MOA_AVX2 inline void block_scales_avx2(const uint8_t* b, __m256& d, __m256& m) {
  const __m256 dm = _mm256_cvtph_ps(_mm_castps_si128(_mm_broadcast_ss(reinterpret_cast<const float*>(b))));
  d = _mm256_permute_ps(dm, 0x00);
  if constexpr (Q == QType::Q4_1)
    m = _mm256_permute_ps(dm, 0x55);
  else if constexpr (Q == QType::Q4_0)
    m = _mm256_mul_ps(_mm256_set1_ps(-8.0f), d);
}

// A block's quants as four vectors of 8 floats, elements 0-7, 8-15, 16-23, 24-31 (Q4_0 and
// Q4_1: 0-15 are the low nibbles of the 16 bytes, 16-31 the high ones). Two widening loads
// of 8 bytes for the nibble types (each byte's two nibbles split after widening), four for Q8_0.
template <QType Q>
MOA_AVX2 inline void block_quants_avx2(const uint8_t* b, __m256 v[4]) {
  if constexpr (Q == QType::Q8_0) {
    for (int c = 0; c < 4; ++c)
      v[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * c))));
  } else {
    constexpr int off = Q == QType::Q4_0 ? 2 : 4;
    const __m256i w0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + off)));
    const __m256i w1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + off + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(w0, mask));
    v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(w1, mask));
    v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 4));
    v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 4));
  }
}

// ys[t][j] = dot(row j, xs[t]) (+ bias) for t < NT, R rows at a time: each block's quants are
// widened once for the NT tokens. Q8_0 sums q * x per block and scales the sum by d (one
// multiply a block, not one per element); Q4_0 and Q4_1 dequantize in registers, d q + m, then
// multiply. A accumulators per (row, token) so that the FMA chains do not bind: one decode
// token is R = 4 rows, A = 2 (8 independent chains; a single row's two chains left the
// kernel waiting on FMA latency, at about half its throughput). Rows are short (360 bytes
// for Q4_1 at k = 576): the row group two ahead is prefetched into L1.
template <QType Q, int NT, int R, int A>
MOA_AVX2 inline void fused_group_avx2(const uint8_t* W, int64_t row_bytes, int64_t nb, int64_t j,
                                      const float* const* xs, float* const* ys, const float* bias) {
  constexpr int64_t kBytes = Q == QType::Q8_0 ? 34 : Q == QType::Q4_0 ? 18 : 20;
  __m256 acc[R][NT][A];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t)
      for (int a = 0; a < A; ++a) acc[r][t][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = W + (j + r) * row_bytes + b * kBytes;
      __m256 v[4], d, m;
      block_scales_avx2<Q>(blk, d, m);
      block_quants_avx2<Q>(blk, v);
      if constexpr (Q == QType::Q8_0) {
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const float* x = xs[t] + 32 * b;
          __m256 s = _mm256_mul_ps(v[0], _mm256_loadu_ps(x));
          s = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + 8), s);
          s = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x + 16), s);
          s = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + 24), s);
          acc[r][t][b % A] = _mm256_fmadd_ps(d, s, acc[r][t][b % A]);
        }
      } else {
        for (int c = 0; c < 4; ++c) v[c] = _mm256_fmadd_ps(d, v[c], m);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const float* x = xs[t] + 32 * b;
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c)
            acc[r][t][c % A] = _mm256_fmadd_ps(v[c], _mm256_loadu_ps(x + 8 * c), acc[r][t][c % A]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
      __m256 s = acc[r][t][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][t][a]);
      ys[t][j + r] = avx2::hsum8(s) + (bias != nullptr ? bias[j + r] : 0.0f);
    }
}

// One token over Q4_1 rows, by the block algebra dot(d q + m, x) = d dot(q, x) + m sum(x):
// per block and row, the quants' dot with x scaled by d, and m times the block's sum of x
// (computed once per call): 6 FMAs a block where dequantizing first takes 8, which at one
// token bind the kernel (about 1.1x). The minimum's products ride in the odd lanes of the
// [d, m, d, m, ...] scales vector times the sums.
template <int R>
MOA_AVX2 inline void q4_1_group_avx2(const uint8_t* W, int64_t row_bytes, int64_t nb, int64_t j, const float* x,
                                     const float* xsum, float* y, const float* bias) {
  constexpr int64_t kBytes = 20;
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), macc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 xs = _mm256_broadcast_ss(xsum + b);
    const float* xb = x + 32 * b;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = W + (j + r) * row_bytes + b * kBytes;
      const __m256 dm = _mm256_cvtph_ps(_mm_castps_si128(_mm_broadcast_ss(reinterpret_cast<const float*>(blk))));
      const __m256i w0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 4)));
      const __m256i w1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 12)));
      __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w0, mask)), _mm256_loadu_ps(xb));
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w1, mask)), _mm256_loadu_ps(xb + 8), s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 4)), _mm256_loadu_ps(xb + 16), s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 4)), _mm256_loadu_ps(xb + 24), s);
      acc[r] = _mm256_fmadd_ps(_mm256_permute_ps(dm, 0x00), s, acc[r]);
      macc[r] = _mm256_fmadd_ps(dm, xs, macc[r]);  // odd lanes: m * sum(x)
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float m[8];  // [.., m sum(x), ..]: the odd lanes are equal
    _mm256_store_ps(m, macc[r]);
    y[j + r] = avx2::hsum8(acc[r]) + m[1] + (bias != nullptr ? bias[j + r] : 0.0f);
  }
}

MOA_AVX2 void q4_1_token_avx2(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1, const float* x,
                              float* y, const float* bias) {
  const int64_t nb = k / 32;
  thread_local std::vector<float> xsum;
  xsum.resize(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    xsum[b] = avx2::hsum8(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                        _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24))));
  }
  constexpr int R = 4;
  constexpr int64_t kAhead = 2;
  const int64_t group_bytes = R * row_bytes;
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    if (j + (kAhead + 1) * R <= j1) {
      const char* ahead = reinterpret_cast<const char*>(W + (j + kAhead * R) * row_bytes);
      for (int64_t o = 0; o < group_bytes; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
    }
    q4_1_group_avx2<R>(W, row_bytes, nb, j, x, xsum.data(), y, bias);
  }
  for (; j < j1; ++j) q4_1_group_avx2<1>(W, row_bytes, nb, j, x, xsum.data(), y, bias);
}

// The group-ahead prefetch is written out in each kernel that reads row groups (as in
// int8_rows): moved into one shared inline helper, it lost most of its prefetches in GCC 12's
// output (33 prefetcht0 in the library, 9 after), and the Q8_0 LM head's one-token product
// fell from 27 to 12 G weights/s.
template <QType Q, int NT, int R, int A>
MOA_AVX2 void fused_rows_avx2(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1,
                              const float* const* xs, float* const* ys, const float* bias) {
  const int64_t nb = k / 32;
  constexpr int64_t kAhead = 2;
  const int64_t group_bytes = R * row_bytes;
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    if (j + (kAhead + 1) * R <= j1) {
      const char* ahead = reinterpret_cast<const char*>(W + (j + kAhead * R) * row_bytes);
      for (int64_t o = 0; o < group_bytes; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
    }
    fused_group_avx2<Q, NT, R, A>(W, row_bytes, nb, j, xs, ys, bias);
  }
  for (; j < j1; ++j) fused_group_avx2<Q, NT, 1, (NT <= 2 ? 2 : 1)>(W, row_bytes, nb, j, xs, ys, bias);
}

template <QType Q>
MOA_AVX2 void fused_tokens_avx2(const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1,
                                const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  switch (m) {
    case 1:
      if constexpr (Q == QType::Q4_1) return q4_1_token_avx2(W, row_bytes, k, j0, j1, xs[0], ys[0], bias);
      return fused_rows_avx2<Q, 1, 4, 2>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 2: return fused_rows_avx2<Q, 2, 4, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 3: return fused_rows_avx2<Q, 3, 2, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 4: return fused_rows_avx2<Q, 4, 2, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 5: return fused_rows_avx2<Q, 5, 1, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 6: return fused_rows_avx2<Q, 6, 1, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    case 7: return fused_rows_avx2<Q, 7, 1, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
    default: return fused_rows_avx2<Q, 8, 1, 1>(W, row_bytes, k, j0, j1, xs, ys, bias);
  }
}

// The fused kernels for 1 to 8 tokens of the 32-element types; true when used.
bool fused_avx2(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  if (m > 8 || m < 1) return false;
  switch (type) {
    case QType::Q8_0: fused_tokens_avx2<QType::Q8_0>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_0: fused_tokens_avx2<QType::Q4_0>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_1: fused_tokens_avx2<QType::Q4_1>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    default: return false;
  }
}

// ys[t][r] = dot(A row r, xs[t]) (+ bias[r]) for r < RB, t < NT over a float tile; k of any
// size (a scalar tail).
template <int RB, int NT>
MOA_AVX2 inline void dot_tile_avx2(const float* A, int64_t k, const float* const* xs, float* const* ys, int64_t r0,
                                   const float* bias) {
  __m256 acc[RB][NT];
  for (int rr = 0; rr < RB; ++rr)
    for (int t = 0; t < NT; ++t) acc[rr][t] = _mm256_setzero_ps();
  const int64_t k8 = k / 8 * 8;
  for (int64_t i = 0; i < k8; i += 8) {
    __m256 xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(xs[t] + i);
#pragma GCC unroll 4
    for (int rr = 0; rr < RB; ++rr) {
      const __m256 av = _mm256_loadu_ps(A + (r0 + rr) * k + i);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[rr][t] = _mm256_fmadd_ps(av, xv[t], acc[rr][t]);
    }
  }
  for (int rr = 0; rr < RB; ++rr)
    for (int t = 0; t < NT; ++t) {
      float sum = avx2::hsum8(acc[rr][t]);
      for (int64_t i = k8; i < k; ++i) sum += A[(r0 + rr) * k + i] * xs[t][i];
      ys[t][r0 + rr] = sum + (bias != nullptr ? bias[r0 + rr] : 0.0f);
    }
}

template <int RB>
MOA_AVX2 void dot_tokens_avx2(const float* A, int64_t k, const float* const* xs, float* const* ys, int64_t m,
                              int64_t r0, const float* bias) {
  // Tiles of RB rows by 2 tokens: 8 accumulators, 2 x vectors and a row vector fit AVX2's 16
  // registers (4 x 4 tiles spilled: 1.1-1.5x slower at 8 to 32 tokens on a Zen 3).
  int64_t q = 0;
  for (; q + 2 <= m; q += 2) dot_tile_avx2<RB, 2>(A, k, xs + q, ys + q, r0, bias);
  if (q < m) dot_tile_avx2<RB, 1>(A, k, xs + q, ys + q, r0, bias);
}

// ys[t][r] for r < rows of a dequantized tile, t < m.
MOA_AVX2 void tile_linear_avx2(const float* A, int64_t k, int64_t rows, const float* const* xs, float* const* ys,
                               int64_t m, const float* bias) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_tokens_avx2<4>(A, k, xs, ys, m, r, bias);
  for (; r < rows; ++r) dot_tokens_avx2<1>(A, k, xs, ys, m, r, bias);
}
#endif

// The AVX-512 levels (the weight-only kernels of avx512 also serve the opt-in ones' other rows).
bool avx512_level(QuantIsa isa) {
  return isa == QuantIsa::avx512 || isa == QuantIsa::avx512_vnni || isa == QuantIsa::avx512_bf16;
}

void dequantize_row(QuantIsa isa, QType type, const uint8_t* row, int64_t k, float* out) {
#if MOA_HAVE_AVX512
  if (avx512_level(isa)) return row_avx512(type, row, k, out);
  if (isa == QuantIsa::avx2) return row_avx2(type, row, k, out);
#endif
  dequantize_row_portable(type, row, k, out);
}

#if MOA_HAVE_AVX512
// ---------------------------------------------------------------------------
// The bfloat16 path (AVX512-BF16): a tile of rows dequantized in float and rounded to
// bfloat16 into L1, then RB rows by NT tokens of vdpbf16ps (32 products an instruction,
// pairs summed into float lanes; products of two bfloat16 are exact in float).

// 32 floats -> 32 bfloat16, round to nearest even (vcvtne2ps2bf16).
MOA_AVX512_BF16 inline void store_bf16x32(uint16_t* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Rows [j, j + rows) of W into tile (rows x k bfloat16): the 32-element types straight from
// their blocks in registers, the others through one row of float scratch.
template <QType Q>
MOA_AVX512_BF16 void tile_bf16(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j, int64_t rows,
                               uint16_t* tile, float* scratch) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = W + (j + r) * row_bytes;
    uint16_t* out = tile + r * k;
    if constexpr (Q == QType::Q8_0 || Q == QType::Q4_0 || Q == QType::Q4_1) {
      constexpr int64_t kBytes = Q == QType::Q8_0 ? 34 : Q == QType::Q4_0 ? 18 : 20;
      for (int64_t b = 0; b < k / 32; ++b) {
        __m512 lo, hi;
        block32<Q>(row + b * kBytes, lo, hi);
        store_bf16x32(out + 32 * b, lo, hi);
      }
    } else {
      row_avx512(type, row, k, scratch);
      for (int64_t i = 0; i < k; i += 32)
        store_bf16x32(out + i, _mm512_loadu_ps(scratch + i), _mm512_loadu_ps(scratch + i + 16));
    }
  }
}

// ys[t][j + rr] = dot(A row rr, X row t) (+ bias) for rr < RB, t < NT; A and X rows are k
// bfloat16 apart, k a multiple of 32.
template <int RB, int NT>
MOA_AVX512_BF16 inline void bf16_tile(const uint16_t* A, int64_t k, const uint16_t* X, float* const* ys, int64_t j,
                                      const float* bias) {
  __m512 acc[RB][NT];
#pragma GCC unroll 4
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[rr][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    __m512bh xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(X + t * k + i);
#pragma GCC unroll 4
    for (int rr = 0; rr < RB; ++rr) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(A + rr * k + i);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[rr][t] = _mm512_dpbf16_ps(acc[rr][t], av, xv[t]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int rr = 0; rr < RB; ++rr)
      ys[t][j + rr] = _mm512_reduce_add_ps(acc[rr][t]) + (bias != nullptr ? bias[j + rr] : 0.0f);
}

template <int RB>
MOA_AVX512_BF16 inline void bf16_tokens(const uint16_t* A, int64_t k, const uint16_t* x, int64_t m, float* const* ys,
                                        int64_t j, const float* bias) {
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) bf16_tile<RB, 4>(A, k, x + q * k, ys + q, j, bias);
  switch (m - q) {
    case 1: bf16_tile<RB, 1>(A, k, x + q * k, ys + q, j, bias); break;
    case 2: bf16_tile<RB, 2>(A, k, x + q * k, ys + q, j, bias); break;
    case 3: bf16_tile<RB, 3>(A, k, x + q * k, ys + q, j, bias); break;
    default: break;
  }
}

template <QType Q>
MOA_AVX512_BF16 void bf16_rows(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t j0, int64_t j1,
                               const uint16_t* x, int64_t m, float* const* ys, const float* bias) {
  constexpr int64_t kRows = 16;
  thread_local std::vector<uint16_t> tile;
  thread_local std::vector<float> scratch;
  tile.resize(static_cast<size_t>(kRows * k));
  scratch.resize(static_cast<size_t>(k));
  for (int64_t jt = j0; jt < j1; jt += kRows) {
    const int64_t rows = std::min(kRows, j1 - jt);
    tile_bf16<Q>(type, W, row_bytes, k, jt, rows, tile.data(), scratch.data());
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) bf16_tokens<4>(tile.data() + r * k, k, x, m, ys, jt + r, bias);
    for (; r < rows; ++r) bf16_tokens<1>(tile.data() + r * k, k, x, m, ys, jt + r, bias);
  }
}

MOA_AVX512_BF16 void round_activations_avx512_bf16(const float* const* xs, int64_t m, int64_t k, uint16_t* out) {
  for (int64_t q = 0; q < m; ++q)
    for (int64_t i = 0; i < k; i += 32)
      store_bf16x32(out + q * k + i, _mm512_loadu_ps(xs[q] + i), _mm512_loadu_ps(xs[q] + i + 16));
}
#endif

bool vnni_available() {
#if MOA_HAVE_AVX512
  static const bool ok = decode_avx512_available() && __builtin_cpu_supports("avx512vnni") &&
                         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

QuantIsa best_isa() {
#if MOA_HAVE_AVX512
  if (vnni_available()) return QuantIsa::avx512_vnni;
  if (decode_avx512_available()) return QuantIsa::avx512;
#endif
  if (avx2_available()) return QuantIsa::avx2;
  return QuantIsa::portable;
}

QuantIsa parse_isa(const std::string& name, const char* what) {
  const QuantIsa best = best_isa();
  // The default: the best weight-only kernels. The int8 path quantizes activations, which
  // costs held-out perplexity (benchmarks/quant_quality.py), so it is opt-in.
  if (name == "auto" || name.empty() || name == "weight_only") return avx512_level(best) ? QuantIsa::avx512 : best;
  if (name == "portable") return QuantIsa::portable;
  if (name == "avx2") {
    if (!avx2_available())
      throw_error<InvalidArgument>(what, "='avx2', but this CPU (or build) has no AVX2, FMA and F16C");
    return QuantIsa::avx2;
  }
  if (name == "avx512") {
    if (!avx512_level(best))
      throw_error<InvalidArgument>(what, "='avx512', but this CPU (or build) has no AVX-512 F/BW/VL/DQ");
    return QuantIsa::avx512;
  }
  if (name == "avx512_bf16") {
    if (!bf16_dot_available())
      throw_error<InvalidArgument>(what, "='avx512_bf16', but this CPU (or build) has no AVX512-BF16");
    return QuantIsa::avx512_bf16;
  }
  if (name == "avx512_vnni") {
    if (best != QuantIsa::avx512_vnni)
      throw_error<InvalidArgument>(what, "='avx512_vnni', but this CPU (or build) has no AVX512-VNNI");
    return QuantIsa::avx512_vnni;
  }
  throw_error<InvalidArgument>(
      what, " must be 'auto', 'portable', 'avx2', 'avx512', 'avx512_vnni', 'avx512_bf16' or 'weight_only', got '", name,
      "'");
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state{[] {
    const char* env = std::getenv("MOA_ENGINE_QUANT_ISA");
    return static_cast<int>(parse_isa(env != nullptr ? env : "", "MOA_ENGINE_QUANT_ISA"));
  }()};
  return state;
}

constexpr int64_t kTileRows = 16;

}  // namespace

QuantIsa quant_isa() { return static_cast<QuantIsa>(isa_state().load(std::memory_order_relaxed)); }

const char* quant_isa_name(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::avx512_vnni: return "avx512_vnni";
    case QuantIsa::avx512_bf16: return "avx512_bf16";
    case QuantIsa::avx512: return "avx512";
    case QuantIsa::avx2: return "avx2";
    default: return "portable";
  }
}

std::string set_quant_isa(const std::string& name) {
  isa_state().store(static_cast<int>(parse_isa(name, "quant ISA")));
  return quant_isa_name(quant_isa());
}

void dequantize_rows(QType type, const uint8_t* data, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                     float* out) {
  const QuantIsa isa = quant_isa();
  for (int64_t r = row0; r < row1; ++r) dequantize_row(isa, type, data + r * row_bytes, k, out + (r - row0) * k);
}

void quant_linear_rows(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                       const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  const QuantIsa isa = quant_isa();
#if MOA_HAVE_AVX512
  if (avx512_level(isa) && fused_avx512(type, W, row_bytes, k, row0, row1, xs, ys, m, bias)) return;
  if (isa == QuantIsa::avx2 && fused_avx2(type, W, row_bytes, k, row0, row1, xs, ys, m, bias)) return;
#endif
  thread_local std::vector<float> tile;
  tile.resize(static_cast<size_t>(kTileRows * k));
  std::vector<float*> shifted(static_cast<size_t>(m));
  for (int64_t j0 = row0; j0 < row1; j0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, row1 - j0);
    for (int64_t r = 0; r < rows; ++r) dequantize_row(isa, type, W + (j0 + r) * row_bytes, k, tile.data() + r * k);
    for (int64_t q = 0; q < m; ++q) shifted[q] = ys[q] + j0;
    const float* b = bias != nullptr ? bias + j0 : nullptr;
#if MOA_HAVE_AVX512
    if (avx512_level(isa)) {
      linear_rows_avx512<float>(tile.data(), k, 0, rows, xs, shifted.data(), m, b);
      continue;
    }
    if (isa == QuantIsa::avx2) {
      tile_linear_avx2(tile.data(), k, rows, xs, shifted.data(), m, b);
      continue;
    }
#endif
    for (int64_t q = 0; q < m; ++q)
      for (int64_t r = 0; r < rows; ++r) {
        const float* w = tile.data() + r * k;
        float acc = 0.0f;
        for (int64_t i = 0; i < k; ++i) acc += w[i] * xs[q][i];
        shifted[q][r] = acc + (b != nullptr ? b[r] : 0.0f);
      }
  }
}

bool int8_kernel(QType type, int64_t k) {
  if (quant_isa() != QuantIsa::avx512_vnni || k % 32 != 0) return false;
  return type == QType::Q8_0 || type == QType::Q4_0 || type == QType::Q4_1;
}

void quantize_activations(const float* const* xs, int64_t m, int64_t k, Int8Rows& out) {
  if (k % 32 != 0) throw_error<InvalidArgument>("quantize_activations: k must be a multiple of 32, got ", k);
  out.m = m, out.k = k;
  out.q.resize(static_cast<size_t>(m * k));
  out.d.resize(static_cast<size_t>(m * k / 32));
  out.qsum.resize(out.d.size());
  out.xsum.resize(out.d.size());
#if MOA_HAVE_AVX512
  if (vnni_available()) return quantize_activations_vnni(xs, m, k, out);
#endif
  const int64_t nb = k / 32;  // the same arithmetic in scalar code
  for (int64_t q = 0; q < m; ++q)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = xs[q] + 32 * b;
      float amax = 0.0f, xsum = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i])), xsum += x[i];
      const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
      int32_t qsum = 0;
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::round(x[i] * id));
        out.q[q * k + 32 * b + i] = static_cast<int8_t>(v);
        qsum += v;
      }
      out.d[q * nb + b] = d, out.qsum[q * nb + b] = qsum, out.xsum[q * nb + b] = xsum;
    }
}

void quant_linear_rows_int8(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                            const Int8Rows& acts, float* const* ys, const float* bias) {
#if MOA_HAVE_AVX512
  if (int8_kernel(type, k) && acts.k == k) {
    switch (type) {
      case QType::Q8_0: return int8_rows<QType::Q8_0>(W, row_bytes, k, row0, row1, acts, ys, bias);
      case QType::Q4_0: return int8_rows<QType::Q4_0>(W, row_bytes, k, row0, row1, acts, ys, bias);
      case QType::Q4_1: return int8_rows<QType::Q4_1>(W, row_bytes, k, row0, row1, acts, ys, bias);
      default: break;
    }
  }
#endif
  throw_error<InvalidArgument>("quant_linear_rows_int8: no int8 kernel for ",
                               ggml_type_name(static_cast<uint32_t>(type)), " with k=", k, " on the kernels in use (",
                               quant_isa_name(quant_isa()), ")");
}

bool bf16_kernel(QType type, int64_t k) {
  if (quant_isa() != QuantIsa::avx512_bf16 || k % 32 != 0) return false;
  const auto info = qtype_info(static_cast<uint32_t>(type));
  return info && k % info->block_elems == 0;
}

void round_activations_bf16(const float* const* xs, int64_t m, int64_t k, std::vector<uint16_t>& out) {
  if (k % 32 != 0) throw_error<InvalidArgument>("round_activations_bf16: k must be a multiple of 32, got ", k);
  out.resize(static_cast<size_t>(m * k));
#if MOA_HAVE_AVX512
  if (bf16_dot_available()) return round_activations_avx512_bf16(xs, m, k, out.data());
#endif
  for (int64_t q = 0; q < m; ++q)
    for (int64_t i = 0; i < k; ++i) out[q * k + i] = c10::BFloat16(xs[q][i]).x;
}

void quant_linear_rows_bf16(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                            const uint16_t* x, int64_t m, float* const* ys, const float* bias) {
#if MOA_HAVE_AVX512
  if (bf16_kernel(type, k)) {
    switch (type) {
      case QType::Q8_0: return bf16_rows<QType::Q8_0>(type, W, row_bytes, k, row0, row1, x, m, ys, bias);
      case QType::Q4_0: return bf16_rows<QType::Q4_0>(type, W, row_bytes, k, row0, row1, x, m, ys, bias);
      case QType::Q4_1: return bf16_rows<QType::Q4_1>(type, W, row_bytes, k, row0, row1, x, m, ys, bias);
      default: return bf16_rows<QType::F32>(type, W, row_bytes, k, row0, row1, x, m, ys, bias);
    }
  }
#endif
  throw_error<InvalidArgument>("quant_linear_rows_bf16: no bfloat16 kernel for ",
                               ggml_type_name(static_cast<uint32_t>(type)), " with k=", k, " on the kernels in use (",
                               quant_isa_name(quant_isa()), ")");
}

}  // namespace moa::cpu
