// Float32 rows to GGML block types (see quantize.h).
#include "kernels/cpu/quantize.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moa/errors.h"

namespace moa::cpu {
namespace {

inline void put_fp16(uint8_t* p, float v) {
  const uint16_t h = c10::detail::fp16_ieee_from_fp32_value(v);
  std::memcpy(p, &h, 2);
}

inline float round_fp16(float v) {
  return c10::detail::fp16_ieee_to_fp32_value(c10::detail::fp16_ieee_from_fp32_value(v));
}

inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);  // a quiet NaN
  return static_cast<uint16_t>((static_cast<uint64_t>(u) + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Round half to even, as ggml's nearest_int.
inline int nearest_int(float v) { return static_cast<int>(std::nearbyint(v)); }

void block_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  put_fp16(b, d);
  auto* qs = reinterpret_cast<int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) qs[i] = static_cast<int8_t>(std::round(x[i] * id));
}

void block_q4_0(const float* x, uint8_t* b) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < 32; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), max = x[i];
  const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  put_fp16(b, d);
  uint8_t* qs = b + 2;
  for (int i = 0; i < 16; ++i) {
    const int lo = std::min(15, static_cast<int>(x[i] * id + 8.5f));
    const int hi = std::min(15, static_cast<int>(x[i + 16] * id + 8.5f));
    qs[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

void block_q4_1(const float* x, uint8_t* b) {
  float min = x[0], max = x[0];
  for (int i = 1; i < 32; ++i) min = std::min(min, x[i]), max = std::max(max, x[i]);
  const float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  put_fp16(b, d);
  put_fp16(b + 2, min);
  uint8_t* qs = b + 4;
  for (int i = 0; i < 16; ++i) {
    const int lo = std::min(15, static_cast<int>((x[i] - min) * id + 0.5f));
    const int hi = std::min(15, static_cast<int>((x[i + 16] - min) * id + 0.5f));
    qs[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// x ~ scale * q - neg_min for q in [0, 15]: the (scale, neg_min >= 0) of least weighted
// squared error among 21 candidate grids (ggml's make_qkx2_quants with nstep 20,
// rmin -1, rdelta 0.1); q goes to L.
float fit_scale_min(const float* x, const float* w, int n, uint8_t* L, float* neg_min) {
  constexpr int kMax = 15;
  float min = x[0], max = x[0], sum_w = w[0], sum_x = w[0] * x[0];
  for (int i = 1; i < n; ++i) {
    min = std::min(min, x[i]), max = std::max(max, x[i]);
    sum_w += w[i], sum_x += w[i] * x[i];
  }
  if (min > 0.0f) min = 0.0f;
  if (max == min) {
    std::fill(L, L + n, 0);
    *neg_min = -min;
    return 0.0f;
  }
  float iscale = kMax / (max - min), scale = 1.0f / iscale, best = 0.0f;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(std::clamp(nearest_int(iscale * (x[i] - min)), 0, kMax));
    const float diff = scale * L[i] + min - x[i];
    best += w[i] * diff * diff;
  }
  uint8_t trial[32];
  for (int step = 0; step <= 20; ++step) {
    iscale = (-1.0f + 0.1f * step + kMax) / (max - min);
    float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(nearest_int(iscale * (x[i] - min)), 0, kMax);
      trial[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l, sum_l2 += w[i] * l * l, sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D <= 0.0f) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0.0f) this_min = 0.0f, this_scale = sum_xl / sum_l2;
    float err = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float diff = this_scale * trial[i] + this_min - x[i];
      err += w[i] * diff * diff;
    }
    if (err < best) {
      std::copy(trial, trial + n, L);
      best = err, scale = this_scale, min = this_min;
    }
  }
  *neg_min = -min;
  return scale;
}

// The 12-byte packing of 8 six-bit (scale, min) pairs that block_q4_k's reader undoes.
void pack_k_scales(const uint8_t* sc, const uint8_t* mn, uint8_t* out) {
  std::memset(out, 0, 12);
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      out[j] = sc[j];
      out[j + 4] = mn[j];
    } else {
      out[j + 4] = static_cast<uint8_t>((sc[j] & 15) | ((mn[j] & 15) << 4));
      out[j - 4] |= static_cast<uint8_t>((sc[j] >> 4) << 6);
      out[j] |= static_cast<uint8_t>((mn[j] >> 4) << 6);
    }
  }
}

void block_q4_k(const float* x, uint8_t* b) {
  float sum_x2 = 0.0f;
  for (int i = 0; i < 256; ++i) sum_x2 += x[i] * x[i];
  const float rms = std::sqrt(sum_x2 / 256.0f);
  float w[32], scales[8], mins[8], max_scale = 0.0f, max_min = 0.0f;
  uint8_t L[256];
  for (int j = 0; j < 8; ++j) {
    for (int l = 0; l < 32; ++l) w[l] = rms + std::fabs(x[32 * j + l]);
    scales[j] = fit_scale_min(x + 32 * j, w, 32, L + 32 * j, &mins[j]);
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = static_cast<uint8_t>(std::min(63, nearest_int(inv_scale * scales[j])));
    mn[j] = static_cast<uint8_t>(std::min(63, nearest_int(inv_min * mins[j])));
  }
  put_fp16(b, max_scale / 63.0f);
  put_fp16(b + 2, max_min / 63.0f);
  pack_k_scales(sc, mn, b + 4);
  // Requantize against the scales as the reader will see them.
  const float d = round_fp16(max_scale / 63.0f), dmin = round_fp16(max_min / 63.0f);
  for (int j = 0; j < 8; ++j) {
    const float ds = d * sc[j], dm = dmin * mn[j];
    if (ds == 0.0f) continue;  // L stays as fitted: every element reads as -dm
    for (int l = 0; l < 32; ++l)
      L[32 * j + l] = static_cast<uint8_t>(std::clamp(nearest_int((x[32 * j + l] + dm) / ds), 0, 15));
  }
  uint8_t* qs = b + 16;
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l) qs[32 * g + l] = static_cast<uint8_t>(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
}

}  // namespace

bool can_quantize(QType type) {
  switch (type) {
    case QType::F32:
    case QType::F16:
    case QType::BF16:
    case QType::Q8_0:
    case QType::Q4_0:
    case QType::Q4_1:
    case QType::Q4_K: return true;
    default: return false;
  }
}

void quantize_rows(QType type, const float* src, int64_t rows, int64_t k, uint8_t* out) {
  const auto info = qtype_info(static_cast<uint32_t>(type));
  if (!info || !can_quantize(type))
    throw_error<InvalidArgument>("quantize: cannot write GGML type ", ggml_type_name(static_cast<uint32_t>(type)),
                                 " (writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K)");
  if (k <= 0 || k % info->block_elems != 0)
    throw_error<InvalidArgument>("quantize: ", info->name, " needs rows of a multiple of ", info->block_elems,
                                 " elements, got ", k);
  const int64_t row_bytes = qtype_row_bytes(*info, k), blocks = k / info->block_elems;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * k;
    uint8_t* o = out + r * row_bytes;
    switch (type) {
      case QType::F32: std::memcpy(o, x, static_cast<size_t>(k) * 4); break;
      case QType::F16:
        for (int64_t i = 0; i < k; ++i) put_fp16(o + 2 * i, x[i]);
        break;
      case QType::BF16:
        for (int64_t i = 0; i < k; ++i) {
          const uint16_t h = to_bf16(x[i]);
          std::memcpy(o + 2 * i, &h, 2);
        }
        break;
      default: {
        void (*block)(const float*, uint8_t*) = type == QType::Q8_0   ? block_q8_0
                                                : type == QType::Q4_0 ? block_q4_0
                                                : type == QType::Q4_1 ? block_q4_1
                                                                      : block_q4_k;
        for (int64_t b = 0; b < blocks; ++b) block(x + b * info->block_elems, o + b * info->block_bytes);
      }
    }
  }
}

}  // namespace moa::cpu
