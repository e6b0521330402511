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
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "kernels/cpu/avx512_util.h"
#include "moa/errors.h"

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

// dot_tile for bfloat16 rows and tokens by vdpbf16ps: 32 products a register, in pairs
// (2i, 2i + 1) summed into float lane i. Products of two bfloat16 are exact in float, so
// only the order of the float additions differs from dot_tile (and subnormal inputs and
// partial sums count as zero: the instruction's DAZ/FTZ). Called after bf16_isa() said the
// CPU has the instruction; not inlined into the AVX-512 callers (a wider target).
template <int RB, int NT>
MOA_AVX512_BF16 void dot_tile_dp(const c10::BFloat16* A, int64_t k, const c10::BFloat16* const* xs, float* out) {
  __m512 acc[RB][NT];
  const c10::BFloat16* x[NT];
#pragma GCC unroll 4
  for (int q = 0; q < NT; ++q) x[q] = xs[q];
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const __mmask32 m = first_n32(k - i);  // zeros past k: their products add nothing
    __m512bh xv[NT];
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) xv[q] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[q] + i);
#pragma GCC unroll 8
    for (int rr = 0; rr < RB; ++rr) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, A + rr * k + i);
#pragma GCC unroll 4
      for (int q = 0; q < NT; ++q) acc[rr][q] = _mm512_dpbf16_ps(acc[rr][q], av, xv[q]);
    }
  }
#pragma GCC unroll 8
  for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) out[q * RB + rr] = _mm512_reduce_add_ps(acc[rr][q]);
}

// out[q] = dot(a, xs[q]) for q < NT: one row read front to back, CH chunks of 16 a step in
// CH * NT independent accumulators. A row at a time is one stream for the hardware
// prefetcher; 8 rows read side by side (dot_tile) are 8 short ones, and on an AMD EPYC
// (Zen 4) that costs a quarter to a third of the bandwidth, the bound at one or two tokens.
template <int NT, int CH, typename T>
MOA_AVX512 inline void dot_row(const T* a, int64_t k, const T* const* xs, float* out) {
  __m512 acc[CH][NT];
#pragma GCC unroll 4
  for (int c = 0; c < CH; ++c)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[c][q] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * CH <= k; i += 16 * CH) {
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const __m512 av = load16(a + i + 16 * c, kAll);
#pragma GCC unroll 4
      for (int q = 0; q < NT; ++q) acc[c][q] = _mm512_fmadd_ps(av, load16(xs[q] + i + 16 * c, kAll), acc[c][q]);
    }
  }
  for (; i < k; i += 16) {
    const __mmask16 m = first_n(k - i);
    const __m512 av = load16(a + i, m);
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[0][q] = _mm512_fmadd_ps(av, load16(xs[q] + i, m), acc[0][q]);
  }
#pragma GCC unroll 4
  for (int q = 0; q < NT; ++q) {
    __m512 sum = acc[0][q];
#pragma GCC unroll 4
    for (int c = 1; c < CH; ++c) sum = _mm512_add_ps(sum, acc[c][q]);
    out[q] = _mm512_reduce_add_ps(sum);
  }
}

// dot_row by vdpbf16ps (see dot_tile_dp), chunks of 32.
template <int NT, int CH>
MOA_AVX512_BF16 void dot_row_dp(const c10::BFloat16* a, int64_t k, const c10::BFloat16* const* xs, float* out) {
  __m512 acc[CH][NT];
#pragma GCC unroll 4
  for (int c = 0; c < CH; ++c)
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q) acc[c][q] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 * CH <= k; i += 32 * CH) {
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i + 32 * c);
#pragma GCC unroll 4
      for (int q = 0; q < NT; ++q)
        acc[c][q] = _mm512_dpbf16_ps(acc[c][q], av, (__m512bh)_mm512_loadu_si512(xs[q] + i + 32 * c));
    }
  }
  for (; i < k; i += 32) {
    const __mmask32 m = first_n32(k - i);
    const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + i);
#pragma GCC unroll 4
    for (int q = 0; q < NT; ++q)
      acc[0][q] = _mm512_dpbf16_ps(acc[0][q], av, (__m512bh)_mm512_maskz_loadu_epi16(m, xs[q] + i));
  }
#pragma GCC unroll 4
  for (int q = 0; q < NT; ++q) {
    __m512 sum = acc[0][q];
#pragma GCC unroll 4
    for (int c = 1; c < CH; ++c) sum = _mm512_add_ps(sum, acc[c][q]);
    out[q] = _mm512_reduce_add_ps(sum);
  }
}

// Rows [row0, row1) of W one at a time against NT tokens (dot_row), each y rounded once.
template <int NT, bool DP, typename T>
MOA_AVX512 void rows_one_by_one(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys,
                                const T* bias) {
  constexpr int CH = 4 / NT;
  for (int64_t j = row0; j < row1; ++j) {
    float out[NT];
    if constexpr (DP) {
      dot_row_dp<NT, CH>(W + j * k, k, xs, out);
    } else {
      dot_row<NT, CH>(W + j * k, k, xs, out);
    }
    const float b = bias != nullptr ? static_cast<float>(bias[j]) : 0.0f;
    for (int q = 0; q < NT; ++q) ys[q][j] = from_float<T>(out[q] + b);
  }
}

// ys[q][j + rr] = dot(W row j + rr, xs[q]) (+ bias[j + rr]), rounded to T, for rr < RB, q < NT.
// DP: the products by dot_tile_dp (T is bfloat16).
template <int RB, int NT, bool DP, typename T>
MOA_AVX512 inline void tile_store(const T* W, int64_t k, int64_t j, const T* const* xs, T* const* ys, const T* bias) {
  float out[RB * NT];
  if constexpr (DP) {
    dot_tile_dp<RB, NT>(W + j * k, k, xs, out);
  } else {
    dot_tile<RB, NT>(W + j * k, k, xs, out);
  }
  for (int q = 0; q < NT; ++q)
    for (int rr = 0; rr < RB; ++rr) {
      const float b = bias != nullptr ? static_cast<float>(bias[j + rr]) : 0.0f;
      ys[q][j + rr] = from_float<T>(out[q * RB + rr] + b);
    }
}

// One block of RB rows of W against all m tokens, 4 tokens a tile: the block stays in
// L1 while the token groups pass over it.
template <int RB, bool DP, typename T>
MOA_AVX512 inline void tile_tokens(const T* W, int64_t k, int64_t j, const T* const* xs, T* const* ys, int64_t m,
                                   const T* bias) {
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) tile_store<RB, 4, DP>(W, k, j, xs + q, ys + q, bias);
  switch (m - q) {
    case 1: return tile_store<RB, 1, DP>(W, k, j, xs + q, ys + q, bias);
    case 2: return tile_store<RB, 2, DP>(W, k, j, xs + q, ys + q, bias);
    case 3: return tile_store<RB, 3, DP>(W, k, j, xs + q, ys + q, bias);
    default: return;
  }
}

template <int RB, bool DP, typename T>
MOA_AVX512 void rows_times_tokens(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys,
                                  int64_t m, const T* bias) {
  int64_t j = row0;
  const int64_t block_bytes = RB * k * int64_t(sizeof(T));
  for (; j + RB <= row1; j += RB) {
    // The next block of rows into L2 while this one serves every token: the block's rows,
    // read side by side, are short streams that the hardware prefetcher starts late.
    if (j + 2 * RB <= row1) {
      const char* next = reinterpret_cast<const char*>(W + (j + RB) * k);
      for (int64_t b = 0; b < block_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
    }
    tile_tokens<RB, DP>(W, k, j, xs, ys, m, bias);
  }
  for (; j < row1; ++j) tile_tokens<1, DP>(W, k, j, xs, ys, m, bias);
}

template <bool DP, typename T>
void linear_rows(const T* W, int64_t k, int64_t row0, int64_t row1, const T* const* xs, T* const* ys, int64_t m,
                 const T* bias) {
  // One or two tokens: the weights' bandwidth bounds the product, so rows are read one at a
  // time (dot_row). More: tiles of 4 rows by 4 tokens (16 accumulator chains), each chunk
  // of W loaded once for 4 tokens.
  if (m == 1) return rows_one_by_one<1, DP>(W, k, row0, row1, xs, ys, bias);
  if (m == 2) return rows_one_by_one<2, DP>(W, k, row0, row1, xs, ys, bias);
  return rows_times_tokens<4, DP>(W, k, row0, row1, xs, ys, m, bias);
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
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_isa() == Bf16Isa::avx512_bf16) return linear_rows<true>(W, k, row0, row1, xs, ys, m, bias);
  }
  linear_rows<false>(W, k, row0, row1, xs, ys, m, bias);
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

bool bf16_dot_available() {
#if MOA_HAVE_AVX512
  static const bool ok = decode_avx512_available() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

namespace {

Bf16Isa parse_bf16_isa(const std::string& name, const char* what) {
  if (name == "auto" || name.empty()) return bf16_dot_available() ? Bf16Isa::avx512_bf16 : Bf16Isa::avx512;
  if (name == "avx512") return Bf16Isa::avx512;
  if (name == "avx512_bf16") {
    if (!bf16_dot_available())
      throw_error<InvalidArgument>(what, "='avx512_bf16', but this CPU (or build) has no AVX512-BF16");
    return Bf16Isa::avx512_bf16;
  }
  throw_error<InvalidArgument>(what, " must be 'auto', 'avx512' or 'avx512_bf16', got '", name, "'");
}

std::atomic<int>& bf16_state() {
  static std::atomic<int> state{[] {
    const char* env = std::getenv("MOA_ENGINE_BF16_ISA");
    return static_cast<int>(parse_bf16_isa(env != nullptr ? env : "", "MOA_ENGINE_BF16_ISA"));
  }()};
  return state;
}

}  // namespace

Bf16Isa bf16_isa() { return static_cast<Bf16Isa>(bf16_state().load(std::memory_order_relaxed)); }

const char* bf16_isa_name(Bf16Isa isa) { return isa == Bf16Isa::avx512_bf16 ? "avx512_bf16" : "avx512"; }

std::string set_bf16_isa(const std::string& name) {
  bf16_state().store(static_cast<int>(parse_bf16_isa(name, "bfloat16 ISA")));
  return bf16_isa_name(bf16_isa());
}

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
