// CPU kernels for the engine's transformer forward (see transformer_cpu.h).
// Attention has an AVX-512 path (16 keys' scores reduced at once, a vectorised exp), an
// AVX2 one (8 keys at once) and a portable one; so do the elementwise kernels (RMSNorm,
// RoPE, SiLU-and-multiply). cpu_isa() (decode_avx2.h) picks the level.
// Kernels tier (csrc/kernels/README.md): arithmetic only, no Python, no model knowledge;
// CPU kernels may use ATen's BLAS and at::parallel_for.
#include "kernels/cpu/transformer_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/avx2_util.h"
#include "kernels/cpu/avx512_util.h"
#include "kernels/cpu/decode_avx2.h"
#include "kernels/cpu/decode_avx512.h"

namespace moa::cpu {
namespace {

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(from_float<T>(v));
}

// Rows per parallel task for the elementwise kernels: enough work to pay for a task.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// ---------------------------------------------------------------------------
// attention, portable

template <typename T>
void attend_portable(const T* qh, const T* k, const T* v, int64_t lo, int64_t hi, const AttentionShape& s,
                     float* scores, T* out) {
  const int64_t D = s.head_dim;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = lo; j <= hi; ++j) {
    const T* kj = k + j * s.kv_pos_stride;
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(qh[d]) * static_cast<float>(kj[d]);
    scores[j - lo] = dot * s.scale;
    mx = std::max(mx, scores[j - lo]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j <= hi - lo; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    sum += scores[j];
  }
  std::vector<float> acc(D, 0.0f);
  for (int64_t j = lo; j <= hi; ++j) {
    const T* vj = v + j * s.kv_pos_stride;
    const float p = scores[j - lo];
    for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vj[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(acc[d] / sum);
}

// ---------------------------------------------------------------------------
// attention, AVX-512

#if MOA_HAVE_AVX512
using namespace avx512;
constexpr int64_t kMaxChunks = 16;  // head_dim <= 256 on this path

template <typename T>
MOA_AVX512 void attend_avx512(const T* qh, const T* k, const T* v, int64_t lo, int64_t hi, const AttentionShape& s,
                              float* scores, T* out) {
  const int64_t D = s.head_dim;
  const int64_t C = (D + 15) / 16;
  __mmask16 masks[kMaxChunks];
  __m512 qv[kMaxChunks];
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int64_t c = 0; c < C; ++c) {
    masks[c] = first_n(D - 16 * c);
    qv[c] = _mm512_mul_ps(load16(qh + 16 * c, masks[c]), scale);
  }
  const int64_t n = hi - lo + 1;
  // Pass 1: scores, 16 keys per shuffle-tree reduction.
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - j0);
    __m512 p[16];
    for (int i = 0; i < 16; ++i) {
      __m512 acc = _mm512_setzero_ps();
      if (i < nk) {
        const T* kj = k + (lo + j0 + i) * s.kv_pos_stride;
        for (int64_t c = 0; c < C; ++c) acc = _mm512_fmadd_ps(load16(kj + 16 * c, masks[c]), qv[c], acc);
      }
      p[i] = acc;
    }
    const __mmask16 m = first_n(nk);
    const __m512 sc = reduce16(p);
    _mm512_mask_storeu_ps(scores + j0, m, sc);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, sc);
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  // Pass 2: exp and sum.
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const __mmask16 m = first_n(n - j0);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j0), mx));
    _mm512_mask_storeu_ps(scores + j0, m, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  // Pass 3: the probability-weighted sum of V rows.
  __m512 acc[kMaxChunks];
  for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m512 pj = _mm512_set1_ps(scores[j]);
    const T* vj = v + (lo + j) * s.kv_pos_stride;
    for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(load16(vj + 16 * c, masks[c]), pj, acc[c]);
  }
  for (int64_t c = 0; c < C; ++c) store16(out + 16 * c, _mm512_mul_ps(acc[c], inv), masks[c]);
}
#endif

// The elementwise kernels on AVX-512: the portable loops' arithmetic, 16 lanes at a time.
// Each rounding to T that the portable loop makes (round_to) is made here too
// (round_through), so bfloat16 results agree; float sums (rms_norm) are added in another
// order, and silu's exp is exp16 (within 2 ulp of std::exp).

template <typename T>
MOA_AVX512 void rms_norm_row_avx512(const T* x, const T* w, T* y, int64_t H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = first_n(H - i);
    const __m512 v = load16(x + i, m);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = first_n(H - i);
    const __m512 normed = round_through<T>(_mm512_mul_ps(load16(x + i, m), rstd));
    store16(y + i, _mm512_mul_ps(load16(w + i, m), normed), m);
  }
}

template <typename T>
MOA_AVX512 void rope_head_avx512(T* xh, const float* cs, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = first_n(half - i);
    const __m512 c = round_through<T>(_mm512_maskz_loadu_ps(m, cs + i));
    const __m512 s = round_through<T>(_mm512_maskz_loadu_ps(m, cs + half + i));
    const __m512 a = load16(xh + i, m), b = load16(xh + half + i, m);
    store16(xh + i, _mm512_sub_ps(round_through<T>(_mm512_mul_ps(a, c)), round_through<T>(_mm512_mul_ps(b, s))), m);
    store16(xh + half + i, _mm512_add_ps(round_through<T>(_mm512_mul_ps(b, c)), round_through<T>(_mm512_mul_ps(a, s))),
            m);
  }
}

template <typename T>
MOA_AVX512 void silu_mul_row_avx512(const T* g, const T* u, T* o, int64_t I) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512 overflow = _mm512_set1_ps(88.72283f);  // exp16's clamp: std::exp is inf above
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = first_n(I - i);
    const __m512 gv = load16(g + i, m);
    const __m512 neg = _mm512_sub_ps(zero, gv);
    // exp(-g) as std::exp gives it past the clamp (inf), so g / (1 + e) is -0 there and NaN
    // at g = -inf, as in the portable loop.
    const __m512 e = _mm512_mask_mov_ps(exp16(neg), _mm512_cmp_ps_mask(neg, overflow, _CMP_GT_OQ), inf);
    const __m512 act = round_through<T>(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
    store16(o + i, _mm512_mul_ps(act, load16(u + i, m)), m);
  }
}

// ---------------------------------------------------------------------------
// attention and the elementwise kernels, AVX2: the AVX-512 ones' arithmetic 8 lanes at a
// time; the last H % 8 elements of a row take the portable loop's expression.

#if MOA_HAVE_AVX2
constexpr int64_t kMaxChunks8 = 32;  // head_dim <= 256 on this path

// dot(k row, q) as 8 partial sums; q is in float, zeros past D.
template <typename T>
MOA_AVX2 inline __m256 key_dot8(const T* kj, const float* q, int64_t D) {
  using namespace avx2;
  const int64_t full = D / 8;
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c < full; ++c) acc = _mm256_fmadd_ps(load8(kj + 8 * c), _mm256_load_ps(q + 8 * c), acc);
  if (8 * c < D) acc = _mm256_fmadd_ps(load8_tail(kj + 8 * c, D - 8 * c), _mm256_load_ps(q + 8 * c), acc);
  return acc;
}

template <typename T>
MOA_AVX2 void attend_avx2(const T* qh, const T* k, const T* v, int64_t lo, int64_t hi, const AttentionShape& s,
                          float* scores, T* out) {
  using namespace avx2;
  const int64_t D = s.head_dim;
  const int64_t full = D / 8, C = (D + 7) / 8;
  alignas(32) float q[8 * kMaxChunks8];  // q * scale in float, zeros past D
  for (int64_t d = 0; d < 8 * C; ++d) q[d] = d < D ? static_cast<float>(qh[d]) * s.scale : 0.0f;
  const int64_t n = hi - lo + 1;
  // Pass 1: scores, 8 keys per reduction.
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nk = std::min<int64_t>(8, n - j0);
    __m256 p[8];
    for (int i = 0; i < 8; ++i)
      p[i] = i < nk ? key_dot8(k + (lo + j0 + i) * s.kv_pos_stride, q, D) : _mm256_setzero_ps();
    alignas(32) float sc[8];
    _mm256_store_ps(sc, reduce8(p));
    for (int64_t i = 0; i < nk; ++i) {
      scores[j0 + i] = sc[i];
      mx = std::max(mx, sc[i]);
    }
  }
  // Pass 2: exp and sum.
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vmx));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum8(vsum);
  for (; j < n; ++j) {
    alignas(32) float e[8];
    _mm256_store_ps(e, exp8(_mm256_set1_ps(scores[j] - mx)));
    scores[j] = e[0];
    sum += e[0];
  }
  // Pass 3: the probability-weighted sum of V rows.
  __m256 acc[kMaxChunks8];
  for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(scores[j]);
    const T* vj = v + (lo + j) * s.kv_pos_stride;
    int64_t c = 0;
    for (; c < full; ++c) acc[c] = _mm256_fmadd_ps(load8(vj + 8 * c), pj, acc[c]);
    if (c < C) acc[c] = _mm256_fmadd_ps(load8_tail(vj + 8 * c, D - 8 * c), pj, acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  int64_t c = 0;
  for (; c < full; ++c) store8(out + 8 * c, _mm256_mul_ps(acc[c], inv));
  if (c < C) {
    alignas(32) float rest[8];
    _mm256_store_ps(rest, _mm256_mul_ps(acc[c], inv));
    for (int64_t d = 8 * c; d < D; ++d) out[d] = from_float<T>(rest[d - 8 * c]);
  }
}

template <typename T>
MOA_AVX2 void rms_norm_row_avx2(const T* x, const T* w, T* y, int64_t H, float eps) {
  using namespace avx2;
  __m256 ss = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    const __m256 v = load8(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float sum = hsum8(ss);
  for (int64_t t = i; t < H; ++t) sum += static_cast<float>(x[t]) * static_cast<float>(x[t]);
  const float rstd_s = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
  const __m256 rstd = _mm256_set1_ps(rstd_s);
  for (i = 0; i + 8 <= H; i += 8) {
    const __m256 normed = round_through<T>(_mm256_mul_ps(load8(x + i), rstd));
    store8(y + i, _mm256_mul_ps(load8(w + i), normed));
  }
  for (; i < H; ++i) y[i] = from_float<T>(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(x[i]) * rstd_s));
}

template <typename T>
MOA_AVX2 void rope_head_avx2(T* xh, const float* cs, int64_t half) {
  using namespace avx2;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 c = round_through<T>(_mm256_loadu_ps(cs + i));
    const __m256 s = round_through<T>(_mm256_loadu_ps(cs + half + i));
    const __m256 a = load8(xh + i), b = load8(xh + half + i);
    store8(xh + i, _mm256_sub_ps(round_through<T>(_mm256_mul_ps(a, c)), round_through<T>(_mm256_mul_ps(b, s))));
    store8(xh + half + i, _mm256_add_ps(round_through<T>(_mm256_mul_ps(b, c)), round_through<T>(_mm256_mul_ps(a, s))));
  }
  for (; i < half; ++i) {
    const float c = round_to<T>(cs[i]), s = round_to<T>(cs[half + i]);
    const float a = static_cast<float>(xh[i]), b = static_cast<float>(xh[half + i]);
    xh[i] = from_float<T>(round_to<T>(a * c) - round_to<T>(b * s));
    xh[half + i] = from_float<T>(round_to<T>(b * c) + round_to<T>(a * s));
  }
}

template <typename T>
MOA_AVX2 void silu_mul_row_avx2(const T* g, const T* u, T* o, int64_t I) {
  using namespace avx2;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 overflow = _mm256_set1_ps(88.72283f);  // exp8's clamp: std::exp is inf above
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = load8(g + i);
    const __m256 neg = _mm256_sub_ps(zero, gv);
    // exp(-g) as std::exp gives it past the clamp (inf), so g / (1 + e) is -0 there and NaN
    // at g = -inf, as in the portable loop.
    const __m256 e = _mm256_blendv_ps(exp8(neg), inf, _mm256_cmp_ps(neg, overflow, _CMP_GT_OQ));
    const __m256 act = round_through<T>(_mm256_div_ps(gv, _mm256_add_ps(one, e)));
    store8(o + i, _mm256_mul_ps(act, load8(u + i)));
  }
  for (; i < I; ++i) {
    const float gv = static_cast<float>(g[i]);
    o[i] = from_float<T>(round_to<T>(gv / (1.0f + std::exp(-gv))) * static_cast<float>(u[i]));
  }
}
#endif

// The level of the attention kernel for this head size (both SIMD paths take head_dim <= 256).
CpuIsa attention_level(int64_t head_dim) { return head_dim <= 256 ? cpu_isa() : CpuIsa::portable; }

}  // namespace

template <typename T>
void rms_norm(const T* x, int64_t ldx, const T* w, T* y, int64_t ldy, int64_t rows, int64_t H, float eps) {
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#if MOA_HAVE_AVX512
      if (isa == CpuIsa::avx512) {
        rms_norm_row_avx512(x + r * ldx, w, y + r * ldy, H, eps);
        continue;
      }
#endif
#if MOA_HAVE_AVX2
      if (isa == CpuIsa::avx2) {
        rms_norm_row_avx2(x + r * ldx, w, y + r * ldy, H, eps);
        continue;
      }
#endif
      const T* xr = x + r * ldx;
      T* yr = y + r * ldy;
      float ss = 0.0f;
      for (int64_t i = 0; i < H; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i) {
        const float normed = round_to<T>(static_cast<float>(xr[i]) * rstd);
        yr[i] = from_float<T>(static_cast<float>(w[i]) * normed);
      }
    }
  });
}

template <typename T>
void rope(T* x, int64_t ldx, int64_t rows, int64_t heads, int64_t D, const int64_t* positions, const float* table) {
  const int64_t half = D / 2;
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, rows, row_grain(heads * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* cs = table + positions[r] * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + r * ldx + h * D;
#if MOA_HAVE_AVX512
        if (isa == CpuIsa::avx512) {
          rope_head_avx512(xh, cs, half);
          continue;
        }
#endif
#if MOA_HAVE_AVX2
        if (isa == CpuIsa::avx2) {
          rope_head_avx2(xh, cs, half);
          continue;
        }
#endif
        for (int64_t i = 0; i < half; ++i) {
          const float c = round_to<T>(cs[i]);
          const float s = round_to<T>(cs[half + i]);
          const float a = static_cast<float>(xh[i]);
          const float b = static_cast<float>(xh[half + i]);
          xh[i] = from_float<T>(round_to<T>(a * c) - round_to<T>(b * s));
          xh[half + i] = from_float<T>(round_to<T>(b * c) + round_to<T>(a * s));
        }
      }
    }
  });
}

template <typename T>
void silu_mul(const T* gu, int64_t ldgu, T* out, int64_t ldo, int64_t rows, int64_t I) {
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, rows, row_grain(I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * ldgu;
      const T* u = g + I;
      T* o = out + r * ldo;
#if MOA_HAVE_AVX512
      if (isa == CpuIsa::avx512) {
        silu_mul_row_avx512(g, u, o, I);
        continue;
      }
#endif
#if MOA_HAVE_AVX2
      if (isa == CpuIsa::avx2) {
        silu_mul_row_avx2(g, u, o, I);
        continue;
      }
#endif
      for (int64_t i = 0; i < I; ++i) {
        const float gv = static_cast<float>(g[i]);
        const float act = round_to<T>(gv / (1.0f + std::exp(-gv)));
        o[i] = from_float<T>(act * static_cast<float>(u[i]));
      }
    }
  });
}

template <typename T>
void attention(const T* q, int64_t ldq, T* out, int64_t ldo, const AttentionSeq<T>* seqs, int64_t n_seqs,
               const AttentionShape& shape) {
  // Work items: (sequence, head, block of up to 16 queries).
  constexpr int64_t kQueryBlock = 16;
  struct Item {
    int64_t seq, head, q0, q1;
  };
  std::vector<Item> items;
  int64_t max_keys = 0;
  for (int64_t s = 0; s < n_seqs; ++s) {
    max_keys = std::max(max_keys, seqs[s].start + seqs[s].n_q);
    for (int64_t h = 0; h < shape.n_heads; ++h)
      for (int64_t q0 = 0; q0 < seqs[s].n_q; q0 += kQueryBlock)
        items.push_back({s, h, q0, std::min(seqs[s].n_q, q0 + kQueryBlock)});
  }
  const int64_t group = shape.n_heads / shape.n_kv_heads;
  const CpuIsa isa = attention_level(shape.head_dim);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(static_cast<size_t>(max_keys) + 16);
    for (int64_t it = i0; it < i1; ++it) {
      const Item& item = items[it];
      const AttentionSeq<T>& sq = seqs[item.seq];
      const int64_t kvh = item.head / group;
      const T* k = sq.k + kvh * shape.kv_head_stride;
      const T* v = sq.v + kvh * shape.kv_head_stride;
      for (int64_t i = item.q0; i < item.q1; ++i) {
        const int64_t row = sq.q_row + i;
        const int64_t hi = sq.start + i;
        const int64_t lo = shape.window > 0 ? std::max<int64_t>(0, hi - shape.window + 1) : 0;
        const T* qh = q + row * ldq + item.head * shape.head_dim;
        T* oh = out + row * ldo + item.head * shape.head_dim;
#if MOA_HAVE_AVX512
        if (isa == CpuIsa::avx512) {
          attend_avx512(qh, k, v, lo, hi, shape, scores.data(), oh);
          continue;
        }
#endif
#if MOA_HAVE_AVX2
        if (isa == CpuIsa::avx2) {
          attend_avx2(qh, k, v, lo, hi, shape, scores.data(), oh);
          continue;
        }
#endif
        attend_portable(qh, k, v, lo, hi, shape, scores.data(), oh);
      }
    }
  });
}

#define MOA_INSTANTIATE(T)                                                                      \
  template void rms_norm<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t, float); \
  template void rope<T>(T*, int64_t, int64_t, int64_t, int64_t, const int64_t*, const float*);  \
  template void silu_mul<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t);                  \
  template void attention<T>(const T*, int64_t, T*, int64_t, const AttentionSeq<T>*, int64_t, const AttentionShape&);
MOA_INSTANTIATE(float)
MOA_INSTANTIATE(c10::BFloat16)
MOA_INSTANTIATE(c10::Half)
#undef MOA_INSTANTIATE

}  // namespace moa::cpu
