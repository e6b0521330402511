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
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

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
  for (; j + RB <= j1; j += RB) tokens(std::integral_constant<int, RB>{}, j);
  for (; j < j1; ++j) tokens(std::integral_constant<int, 1>{}, j);
}

// The fused kernels take few tokens (they dequantize once per 4 tokens); true when used.
bool fused_avx512(QType type, const uint8_t* W, int64_t row_bytes, int64_t k, int64_t row0, int64_t row1,
                  const float* const* xs, float* const* ys, int64_t m, const float* bias) {
  if (m > 4) return false;
  switch (type) {
    case QType::Q8_0: fused_rows<QType::Q8_0, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_0: fused_rows<QType::Q4_0, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    case QType::Q4_1: fused_rows<QType::Q4_1, 4>(W, row_bytes, k, row0, row1, xs, ys, m, bias); return true;
    default: return false;
  }
}
#endif

void dequantize_row(QuantIsa isa, QType type, const uint8_t* row, int64_t k, float* out) {
#if MOA_HAVE_AVX512
  if (isa == QuantIsa::avx512) return row_avx512(type, row, k, out);
#endif
  dequantize_row_portable(type, row, k, out);
}

QuantIsa best_isa() {
#if MOA_HAVE_AVX512
  if (decode_avx512_available()) return QuantIsa::avx512;
#endif
  return QuantIsa::portable;
}

QuantIsa parse_isa(const std::string& name, const char* what) {
  const QuantIsa best = best_isa();
  if (name == "auto" || name.empty()) return best;
  if (name == "portable") return QuantIsa::portable;
  if (name == "avx512") {
    if (best != QuantIsa::avx512)
      throw_error<InvalidArgument>(what, "='avx512', but this CPU (or build) has no AVX-512 F/BW/VL/DQ");
    return QuantIsa::avx512;
  }
  throw_error<InvalidArgument>(what, " must be 'auto', 'portable' or 'avx512', got '", name, "'");
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

const char* quant_isa_name(QuantIsa isa) { return isa == QuantIsa::avx512 ? "avx512" : "portable"; }

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
  if (isa == QuantIsa::avx512 && fused_avx512(type, W, row_bytes, k, row0, row1, xs, ys, m, bias)) return;
#endif
  thread_local std::vector<float> tile;
  tile.resize(static_cast<size_t>(kTileRows * k));
  std::vector<float*> shifted(static_cast<size_t>(m));
  for (int64_t j0 = row0; j0 < row1; j0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, row1 - j0);
    for (int64_t r = 0; r < rows; ++r) dequantize_row(isa, type, W + (j0 + r) * row_bytes, k, tile.data() + r * k);
    for (int64_t q = 0; q < m; ++q) shifted[q] = ys[q] + j0;
    const float* b = bias != nullptr ? bias + j0 : nullptr;
    if (isa == QuantIsa::avx512) {
      linear_rows_avx512<float>(tile.data(), k, 0, rows, xs, shifted.data(), m, b);
      continue;
    }
    for (int64_t q = 0; q < m; ++q)
      for (int64_t r = 0; r < rows; ++r) {
        const float* w = tile.data() + r * k;
        float acc = 0.0f;
        for (int64_t i = 0; i < k; ++i) acc += w[i] * xs[q][i];
        shifted[q][r] = acc + (b != nullptr ? b[r] : 0.0f);
      }
  }
}

}  // namespace moa::cpu
