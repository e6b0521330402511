// The engine's weights and how they are loaded from an HF checkpoint.
//
// One declarative table (weights.cpp, kLayerTensors / kModelTensors) maps each HF
// tensor name to its place in the engine's layout. q/k/v are fused into one [qkv, H]
// matrix and gate/up into one [2I, H], so each takes a single GEMM. Every tensor's
// shape is checked against config.json, and its mapped pages are released as soon as
// it has been copied, so loading never holds a second copy of the model.
//
// Dimension legend: H hidden, I intermediate, D head dim, nh / nkv heads,
// Q = nh * D, KV = nkv * D, V vocabulary.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "engine/linear.h"
#include "moa/engine.h"

namespace moa::engine {

struct LayerWeights {
  at::Tensor attn_norm;  // [H]
  Matrix wqkv;           // [Q + 2 KV, H]: rows q, then k, then v
  at::Tensor bqkv;       // [Q + 2 KV], or undefined when the model has no q/k/v bias
  Matrix wo;             // [H, Q]
  at::Tensor mlp_norm;   // [H]
  Matrix w_gate_up;      // [2 I, H]: rows gate, then up
  Matrix w_down;         // [H, I]
};

struct ModelWeights {
  Matrix embed;  // [V, H]
  std::vector<LayerWeights> layers;
  at::Tensor final_norm;  // [H]
  Matrix lm_head;         // [V, H]; the same tensors as embed when tied
  bool tied = false;
  int64_t bytes() const;  // held bytes, a tied matrix counted once
};

// The matrices above are dense (in the engine's dtype) from an HF checkpoint, and
// quantized, as the file holds them, from a GGUF file (load_gguf_weights, gguf_weights.cpp).

// Loads model_dir's safetensors into `dtype` on `device`. Throws FormatError naming
// the tensor for a missing or mis-shaped one, FileNotFound for missing files.
ModelWeights load_weights(const std::string& model_dir, const ModelConfig& config, at::ScalarType dtype,
                          at::Device device);

class GgufFile;

// Whether `path` names a GGUF file (it ends in .gguf, any case): the engine then reads it
// with load_gguf_weights instead of as an HF folder.
bool is_gguf_path(const std::string& path);

// The same from a GGUF file (gguf.h), each matrix kept in the file's GGML type; float
// matrices, norms and biases in `dtype`. CPU only. Throws FormatError naming the file and
// the tensor for a missing or mis-shaped one.
ModelWeights load_gguf_weights(const GgufFile& file, const ModelConfig& config, at::ScalarType dtype,
                               at::Device device);

// Quantize on load: "q8_0", "q4_0", "q4_1" or "q4_k" as that type, "" as nullopt; any
// other name throws InvalidArgument listing the choices.
std::optional<cpu::QType> parse_quantization(const std::string& name);

// Quantizes every dense matrix of `weights` in place (quantize_weights.cpp): the layers'
// projections to `type`, the embedding and LM head to Q8_0. A matrix whose row length
// does not fit the type's blocks (256 for Q4_K, 32 for the rest) takes Q8_0, or stays
// dense if that does not fit either. Matrices already quantized (a GGUF file's) keep
// their types. CPU only.
void quantize_weights(ModelWeights& weights, cpu::QType type);

// x [n, k] (any float dtype, CPU) as uint8 [n, row bytes] of `type`, rows split over the
// intra-op pool. k must fit the type's blocks (cpu::quantize_rows throws otherwise).
at::Tensor quantize_dense(const at::Tensor& x, cpu::QType type);

}  // namespace moa::engine
