// The Llama-family forward over a packed batch of sequences, with a slot-based KV
// cache. One forward serves prefill, decode (both in the same batch) and scoring.
//
// Dimension legend: N tokens in the packed batch, S sequences, H hidden size,
// D head dim, nh / nkv heads, Q = nh * D, KV = nkv * D, I intermediate, V vocabulary.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "engine/adapters.h"
#include "engine/backend.h"
#include "engine/weights.h"
#include "moa/engine.h"

namespace moa::engine {

// K and V for every layer, one slot per running sequence.
struct KvCache {
  std::vector<at::Tensor> k, v;  // per layer: [slots, nkv, capacity, D]
  int64_t slots = 0;
  int64_t capacity = 0;  // positions per slot
};

// One forward: S sequences whose new tokens are packed row after row.
struct Batch {
  struct Seq {
    int64_t slot = -1;  // KV-cache slot; -1: a one-off sequence (scoring), kept in scratch
    int64_t start = 0;  // tokens already in the slot (position of the first new token)
    int64_t len = 0;    // new tokens
    // The expert slot per layer ([num_layers], -1: none); null: no expert anywhere.
    int64_t* experts = nullptr;
    // Route at every layer (prefill): experts[l] is chosen by router l from the mean of
    // the sequence's normed layer input, and the router's probabilities are written to
    // router_probs[l * n_domains, +n_domains) when not null.
    bool route = false;
    float* router_probs = nullptr;
    // The routers pool over the first route_len of the len tokens (the prompt); 0: all.
    int64_t route_len = 0;
  };
  std::vector<int64_t> tokens;  // [N]
  std::vector<Seq> seqs;        // [S]; sum of len == N
  bool all_logits = false;      // logits for every token (scoring), else each sequence's last
  bool want_logits = true;      // false: stop after the last layer (a routing pass)
};

class Model {
 public:
  // backend: where the forward runs (backend.h); the weights are on its device.
  Model(ModelConfig config, ModelWeights weights, at::ScalarType dtype, int64_t max_positions,
        std::shared_ptr<const Backend> backend);

  // Logits, float32: [N, V] with all_logits, else [S, V]. Writes the new tokens' K and V
  // into their slots.
  at::Tensor forward(const Batch& batch, KvCache* cache) const;

  KvCache make_cache(int64_t slots, int64_t capacity) const;

  // The experts (replaced as a whole; in-flight sequences keep their slots).
  void set_adapters(std::shared_ptr<const AdapterTable> table) { adapters_ = std::move(table); }
  const AdapterTable& adapters() const { return *adapters_; }
  // Routers: per layer a [n_domains, H] float32 matrix; domain_slots[d] is the expert
  // slot of domain d (-1: not loaded, never chosen).
  void set_router(std::vector<at::Tensor> router, std::vector<int64_t> domain_slots);
  bool has_router() const { return !router_.empty(); }
  int64_t router_domains() const { return router_.empty() ? 0 : router_[0].size(0); }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  at::ScalarType dtype() const { return dtype_; }
  const Backend& backend() const { return *backend_; }
  at::Device device() const { return weights_.final_norm.device(); }

 private:
  // y = x W^T (+ b), then each target's adapter hook on its block of columns of y.
  // ids: [N] expert slot per token for this layer (undefined: no expert in the batch).
  at::Tensor project(int64_t layer, const at::Tensor& x, const Matrix& w, const at::Tensor& b,
                     std::initializer_list<Target> targets, const at::Tensor& ids) const;
  // The adapter hook every target linear passes through: the experts' grouped LoRA
  // update, y += scales[e] * (x @ A[e]^T) @ B[e]^T per token, in one backend call.
  void adapt(int64_t layer, Target target, const at::Tensor& x, const at::Tensor& y, const at::Tensor& ids) const;
  // Chooses the experts of routed sequences at this layer from xn: [N, H].
  void route(int64_t layer, const at::Tensor& xn, const Batch& batch) const;
  at::Tensor layer_expert_ids(int64_t layer, const Batch& batch) const;
  void attention_block(int64_t layer, at::Tensor& h, const Batch& batch, const at::Tensor& positions,
                       const std::vector<SeqSpan>& spans, const KvStores& stores, const ForwardPlan* plan,
                       at::Tensor& ids) const;
  void mlp_block(int64_t layer, at::Tensor& h, const at::Tensor& ids) const;

  ModelConfig config_;
  ModelWeights weights_;
  at::ScalarType dtype_;
  int64_t max_positions_;
  at::Tensor rope_table_;  // [max_positions, D] float32: cos in [:, :D/2], sin in [:, D/2:]
  std::shared_ptr<const AdapterTable> adapters_;
  std::vector<at::Tensor> router_;  // [num_layers] x [n_domains, H] float32
  std::vector<int64_t> router_slots_;
  std::shared_ptr<const Backend> backend_;
};

// rope_table_ as transformers computes it (float32, llama3 scaling when configured).
at::Tensor make_rope_table(const ModelConfig& config, int64_t max_positions);

}  // namespace moa::engine
