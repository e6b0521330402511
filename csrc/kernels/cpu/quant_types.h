// The GGML tensor types moa_engine reads and serves, with their block layouts.
//
// A quantized matrix [N, K] is stored as GGUF stores it: row after row, each row
// K / block_elems blocks of block_bytes bytes (K must be a multiple of block_elems).
// Layouts (all little-endian, fp16 scales as IEEE binary16):
//   F32   1 elem, 4 B; F16 1 elem, 2 B; BF16 1 elem, 2 B
//   Q8_0  32 elems, 34 B: d (fp16), qs[32] int8            x = d * q
//   Q4_0  32 elems, 18 B: d (fp16), qs[16] nibbles          x = d * (q - 8)
//   Q4_1  32 elems, 20 B: d, m (fp16), qs[16] nibbles       x = d * q + m
//         (nibbles: qs[j] & 15 is element j, qs[j] >> 4 is element j + 16)
//   Q4_K  256 elems, 144 B: d, dmin (fp16), scales[12] (8 pairs of 6-bit scale / min),
//         qs[128]: 4 groups of 64 elements; in group g, byte qs[32 g + l] holds element
//         64 g + l (low nibble) and 64 g + 32 + l (high nibble); sub-block s (32 elems)
//         has x = d * sc[s] * q - dmin * mn[s]
//   Q5_K  256 elems, 176 B: d, dmin, scales[12], qh[32] (the fifth bits), qs[128]
//   Q6_K  256 elems, 210 B: ql[128], qh[64], scales[16] (int8), d (fp16)
//         x = d * scales[16 sub-blocks] * (q - 32)
// The numbers are ggml's type ids, which GGUF files store.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace moa::cpu {

enum class QType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
};

struct QTypeInfo {
  const char* name;     // as ggml names it: "Q4_K"
  int64_t block_elems;  // elements per block
  int64_t block_bytes;  // bytes per block
};

// The layout of a type moa_engine serves; nullopt for any other ggml type id.
std::optional<QTypeInfo> qtype_info(uint32_t ggml_type);

// ggml's name of any type id (also those moa_engine does not serve: "Q2_K", "IQ4_XS"),
// or "type <id>" for an id ggml does not define.
std::string ggml_type_name(uint32_t ggml_type);

// Bytes of one row of k elements: k / block_elems * block_bytes. Requires k % block_elems == 0.
inline int64_t qtype_row_bytes(const QTypeInfo& info, int64_t k) { return k / info.block_elems * info.block_bytes; }

// "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K": for error messages.
const char* served_qtype_names();

}  // namespace moa::cpu
