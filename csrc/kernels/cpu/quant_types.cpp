// The GGML tensor types moa_engine serves (see quant_types.h).
#include "kernels/cpu/quant_types.h"

namespace moa::cpu {

std::optional<QTypeInfo> qtype_info(uint32_t ggml_type) {
  switch (static_cast<QType>(ggml_type)) {
    case QType::F32: return QTypeInfo{"F32", 1, 4};
    case QType::F16: return QTypeInfo{"F16", 1, 2};
    case QType::BF16: return QTypeInfo{"BF16", 1, 2};
    case QType::Q8_0: return QTypeInfo{"Q8_0", 32, 34};
    case QType::Q4_0: return QTypeInfo{"Q4_0", 32, 18};
    case QType::Q4_1: return QTypeInfo{"Q4_1", 32, 20};
    case QType::Q4_K: return QTypeInfo{"Q4_K", 256, 144};
    case QType::Q5_K: return QTypeInfo{"Q5_K", 256, 176};
    case QType::Q6_K: return QTypeInfo{"Q6_K", 256, 210};
  }
  return std::nullopt;
}

std::string ggml_type_name(uint32_t ggml_type) {
  // ggml's type table (ggml.h, enum ggml_type); ids 4, 5 and 31-33 are retired.
  static const char* const kNames[] = {
      "F32",   "F16",    "Q4_0",  "Q4_1",  nullptr, nullptr,   "Q5_0",   "Q5_1",    "Q8_0",  "Q8_1",   "Q2_K",
      "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",  "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
      "IQ2_S", "IQ4_XS", "I8",    "I16",   "I32",   "I64",     "F64",    "IQ1_M",   "BF16",  nullptr,  nullptr,
      nullptr, "TQ1_0",  "TQ2_0", nullptr, nullptr, nullptr,   "MXFP4",  "NVFP4",   "Q1_0"};
  if (ggml_type < sizeof(kNames) / sizeof(kNames[0]) && kNames[ggml_type] != nullptr) return kNames[ggml_type];
  return "type " + std::to_string(ggml_type);
}

const char* served_qtype_names() { return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"; }

}  // namespace moa::cpu
