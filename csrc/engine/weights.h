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

#include <string>
#include <vector>

#include "moa/engine.h"

namespace moa::engine {

struct LayerWeights {
  at::Tensor attn_norm;  // [H]
  at::Tensor wqkv;       // [Q + 2 KV, H]: rows q, then k, then v
  at::Tensor bqkv;       // [Q + 2 KV], or undefined when the model has no q/k/v bias
  at::Tensor wo;         // [H, Q]
  at::Tensor mlp_norm;   // [H]
  at::Tensor w_gate_up;  // [2 I, H]: rows gate, then up
  at::Tensor w_down;     // [H, I]
};

struct ModelWeights {
  at::Tensor embed;  // [V, H]
  std::vector<LayerWeights> layers;
  at::Tensor final_norm;  // [H]
  at::Tensor lm_head;     // [V, H]; the same tensor as embed when tied
  int64_t bytes() const;  // held bytes, a tied matrix counted once
};

// Loads model_dir's safetensors into `dtype` on `device`. Throws FormatError naming
// the tensor for a missing or mis-shaped one, FileNotFound for missing files.
ModelWeights load_weights(const std::string& model_dir, const ModelConfig& config, at::ScalarType dtype,
                          at::Device device);

}  // namespace moa::engine
