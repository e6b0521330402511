// The LoRA experts the engine serves, stacked for the expert-grouped op.
//
// Every expert occupies a slot. For each layer and target linear, the experts' A and B
// are stacked (zero-padded to the largest rank) as the grouped op takes them:
//   a [E, r, in], b [E, out, r], scales [E] float32
// so one grouped_lora_add_ per target linear computes every sequence's update:
//   y[t] += scales[e] * (x[t] @ a[e]^T) @ b[e]^T,  e = the expert slot of token t's sequence.
// An expert without a given (layer, target) has zeros there. Slots are stable: removing
// an expert frees its slot only when no running sequence uses it, so requests in flight
// keep the expert they started with.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moa/engine.h"

namespace moa::engine {

// The target linears, in the order of their blocks in the fused projections.
enum class Target { q, k, v, o, gate, up, down };
constexpr int kNumTargets = 7;
const char* target_name(Target t);  // "q_proj", ..., "down_proj"

// One expert's weights for one target linear.
struct LoraPiece {
  at::Tensor a;  // [r, in]
  at::Tensor b;  // [out, r]
  float scale = 1.0f;
};

// One expert: pieces keyed by (layer, target).
using LoraPieces = std::map<std::pair<int64_t, Target>, LoraPiece>;

class AdapterTable {
 public:
  struct Stack {
    at::Tensor a, b, scales;  // [E, r, in], [E, out, r], [E]; undefined when no expert has it
  };

  // The stacks are held in `dtype` on `device` (the model's).
  AdapterTable(const ModelConfig& config, at::ScalarType dtype, at::Device device = at::kCPU);

  // A new table with `name` in a free slot (or a new one). Checks every piece against
  // the model (layer range, shapes); throws InvalidArgument naming the piece.
  std::shared_ptr<AdapterTable> with_expert(const std::string& name, const LoraPieces& pieces) const;
  // A new table where the expert in `slot` goes by another name (a removed expert that
  // requests still use, so that the name can be loaded again).
  std::shared_ptr<AdapterTable> with_name(int64_t slot, const std::string& name) const;
  // A new table without the expert in `slot` (its weights zeroed, the slot free).
  std::shared_ptr<AdapterTable> without_slot(int64_t slot) const;

  int64_t slot_of(const std::string& name) const;                   // -1 if absent
  const std::vector<std::string>& names() const { return names_; }  // by slot; "" = free
  bool empty() const;
  const Stack& stack(int64_t layer, Target t) const { return stacks_[layer][static_cast<int>(t)]; }
  int64_t slots() const { return static_cast<int64_t>(names_.size()); }

 private:
  std::pair<int64_t, int64_t> dims(Target t) const;  // (in, out) of the target linear
  // with_expert's steps: check the name and every piece against the model; take a free
  // slot (or a new one) for the name; write the slot of one (layer, target) stack (its
  // piece, or zeros when piece is null), growing the stack to every slot and the largest
  // rank, and copying it first so that the table it was copied from stays as it was.
  void check_expert(const std::string& name, const LoraPieces& pieces) const;
  int64_t claim_slot(const std::string& name);
  void write_slot(int64_t layer, Target t, int64_t slot, const LoraPiece* piece);
  ModelConfig config_;
  at::ScalarType dtype_;
  at::Device device_;
  std::vector<std::string> names_;
  std::vector<std::array<Stack, kNumTargets>> stacks_;  // [layer][target]
};

}  // namespace moa::engine
