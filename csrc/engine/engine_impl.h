// The private state of moa::Engine (include/moa/engine.h), shared by the files that
// implement it:
//   engine.cpp      construction (options, dtype, weights, KV cache), experts and routers
//   scheduler.cpp   submit / step / generate: continuous batching over KV-cache slots
//   routing.cpp     which experts serve a sequence: its domain, or the routers' choice
//   scoring.cpp     forward() and route(): one-off passes that use no KV-cache slot
// Every public method of Engine locks `mu`; the Impl methods assume it is held.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "engine/adapters.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "moa/engine.h"

namespace moa {
namespace engine {

// One request (or one row of forward() / route()) as the engine serves it.
struct Sequence {
  int64_t id = 0;
  GenerationRequest request;
  Rng rng;
  int64_t slot = -1;   // its KV-cache slot while running; -1 waiting, finished or one-off
  int64_t cached = 0;  // tokens in the slot's KV cache
  std::vector<int64_t> generated;
  bool cancel = false;
  // Experts: the slot per layer (fixed at submit for a named domain, at prefill when
  // routed), or empty for the base model.
  std::vector<int64_t> experts;
  std::optional<RoutingStrategy> routing;  // set when the routers choose the experts
  std::vector<float> router_probs;         // [num_layers * n_domains] when routed
  bool reported = false;                   // routing info sent with the first event
  std::vector<std::string> layer_names;    // the experts' names when they were fixed
};

}  // namespace engine

struct Engine::Impl {
  using Sequence = engine::Sequence;

  std::string model_dir;
  EngineOptions options;
  ModelConfig config;
  at::ScalarType dtype;
  std::unique_ptr<engine::Model> model;
  engine::KvCache cache;
  engine::Sampler sampler;

  mutable std::recursive_mutex mu;
  int64_t next_id = 0;
  std::deque<std::shared_ptr<Sequence>> waiting;
  std::vector<std::shared_ptr<Sequence>> slots;  // [max_batch]; null when free
  // Events of requests that generate() ran alongside its own; the next step() returns them.
  std::vector<StepEvent> pending;

  std::shared_ptr<const engine::AdapterTable> adapters;
  std::set<int64_t> retiring;  // removed experts' slots, freed once no sequence uses them
  std::vector<std::string> router_domains;
  std::vector<at::Tensor> router;
  RoutingStrategy strategy = RoutingStrategy::kLast;

  // Experts and routers (engine.cpp).
  std::vector<std::string> known_domains() const;  // loaded experts not being removed, slot order
  void publish_adapters(std::shared_ptr<const engine::AdapterTable> table);  // to the model too
  void free_retired();  // frees the retiring slots that no sequence uses any more

  // The scheduler (scheduler.cpp).
  struct StepRows;  // the rows of one step's forward
  void validate(const GenerationRequest& r) const;
  std::vector<StepEvent> step();
  void drop_cancelled(std::vector<StepEvent>& events);
  void add_running(StepRows& rows) const;
  void admit(StepRows& rows);
  at::Tensor run_forward(StepRows& rows);
  void sample_and_emit(const StepRows& rows, const at::Tensor& logits, std::vector<StepEvent>& events);
  bool stops(const Sequence& s, int64_t token) const;
  std::string non_finite_message(const Sequence& s) const;
  void finish(Sequence& s, FinishReason reason, std::vector<StepEvent>& events, int64_t token, std::string error = {});
  void release_all(const std::vector<int64_t>& ids);

  // Routing (routing.cpp).
  void check_routing(std::optional<RoutingStrategy> strategy) const;  // none passes; else needs a router
  void resolve_domain(Sequence& s) const;
  void route_first(const std::vector<std::shared_ptr<Sequence>>& seqs, bool per_layer_too = false);
  void keep_layer_names(Sequence& s) const;  // routed experts are fixed: keep their names
  std::shared_ptr<const RoutingInfo> routing_info(const Sequence& s) const;
};

}  // namespace moa
