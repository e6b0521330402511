// Quantize on load (weights.h: quantize_weights): float matrices to GGML block types, with
// the kernels' quantizers (kernels/cpu/quantize.h), rows split over the intra-op pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "engine/weights.h"
#include "kernels/cpu/quantize.h"
#include "moa/errors.h"

namespace moa::engine {
namespace {

using cpu::QType;

// The type a [n, k] matrix takes when `wanted` was asked: wanted where k fits its blocks,
// else Q8_0 (32-element blocks), else none (the matrix stays dense).
std::optional<QType> fitting_type(QType wanted, int64_t k) {
  for (QType t : {wanted, QType::Q8_0})
    if (k % cpu::qtype_info(static_cast<uint32_t>(t))->block_elems == 0) return t;
  return std::nullopt;
}

void quantize_matrix(Matrix& w, QType wanted) {
  if (!w.defined() || w.quantized()) return;  // a GGUF file's quantized matrices keep their types
  const auto type = fitting_type(wanted, w.k);
  if (!type) return;
  Matrix q;
  q.n = w.n, q.k = w.k;
  q.quant.push_back(QuantRows{*type, quantize_dense(w.dense, *type), w.n});
  w = std::move(q);
}

}  // namespace

at::Tensor quantize_dense(const at::Tensor& x, cpu::QType type) {
  const at::Tensor src = x.to(at::kFloat).contiguous();
  const int64_t n = src.size(0), k = src.size(1);
  const int64_t row_bytes = cpu::qtype_row_bytes(*cpu::qtype_info(static_cast<uint32_t>(type)), k);
  at::Tensor out = at::empty({n, row_bytes}, at::TensorOptions().dtype(at::kByte));
  const float* s = src.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(
      0, n, 16, [&](int64_t r0, int64_t r1) { cpu::quantize_rows(type, s + r0 * k, r1 - r0, k, o + r0 * row_bytes); });
  return out;
}

std::optional<cpu::QType> parse_quantization(const std::string& name) {
  if (name.empty()) return std::nullopt;
  static const std::pair<const char*, QType> kTypes[] = {
      {"q8_0", QType::Q8_0}, {"q4_0", QType::Q4_0}, {"q4_1", QType::Q4_1}, {"q4_k", QType::Q4_K}};
  for (const auto& [n, t] : kTypes)
    if (name == n) return t;
  throw_error<InvalidArgument>("quantization must be one of q8_0, q4_0, q4_1, q4_k (or empty for none), got '", name,
                               "'");
}

void quantize_weights(ModelWeights& weights, cpu::QType type) {
  if (weights.embed.defined() && weights.embed.dense.defined() && !weights.embed.dense.device().is_cpu())
    throw_error<InvalidArgument>("quantization is CPU only: load the model with device=\"cpu\"");
  for (LayerWeights& layer : weights.layers) {
    quantize_matrix(layer.wqkv, type);
    quantize_matrix(layer.wo, type);
    quantize_matrix(layer.w_gate_up, type);
    quantize_matrix(layer.w_down, type);
  }
  // The embedding and the LM head in Q8_0 whatever `type`: they are read a row at a time
  // or once per token and most sensitive to rounding (llama.cpp keeps its output at 6 bits
  // or more for the same reason).
  quantize_matrix(weights.embed, QType::Q8_0);
  if (weights.tied)
    weights.lm_head = weights.embed;
  else
    quantize_matrix(weights.lm_head, QType::Q8_0);
}

}  // namespace moa::engine
