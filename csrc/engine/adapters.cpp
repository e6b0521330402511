#include "engine/adapters.h"

#include <ATen/ATen.h>

namespace moa::engine {

const char* target_name(Target t) {
  static const char* names[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names[static_cast<int>(t)];
}

AdapterTable::AdapterTable(const ModelConfig& config, at::ScalarType dtype, at::Device device)
    : config_(config), dtype_(dtype), device_(device), stacks_(static_cast<size_t>(config.num_layers)) {}

std::pair<int64_t, int64_t> AdapterTable::dims(Target t) const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, Q = c.num_heads * c.head_dim, KV = c.num_kv_heads * c.head_dim;
  switch (t) {
    case Target::q: return {H, Q};
    case Target::k:
    case Target::v: return {H, KV};
    case Target::o: return {Q, H};
    case Target::gate:
    case Target::up: return {H, c.intermediate_size};
    case Target::down: return {c.intermediate_size, H};
  }
  return {0, 0};
}

int64_t AdapterTable::slot_of(const std::string& name) const {
  for (size_t i = 0; i < names_.size(); ++i)
    if (names_[i] == name) return static_cast<int64_t>(i);
  return -1;
}

bool AdapterTable::empty() const {
  for (const auto& n : names_)
    if (!n.empty()) return false;
  return true;
}

std::shared_ptr<AdapterTable> AdapterTable::with_expert(const std::string& name, const LoraPieces& pieces) const {
  check_expert(name, pieces);
  auto next = std::make_shared<AdapterTable>(*this);
  const int64_t slot = next->claim_slot(name);
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int ti = 0; ti < kNumTargets; ++ti) {
      const Target t = static_cast<Target>(ti);
      auto it = pieces.find({l, t});
      next->write_slot(l, t, slot, it != pieces.end() ? &it->second : nullptr);
    }
  }
  return next;
}

void AdapterTable::check_expert(const std::string& name, const LoraPieces& pieces) const {
  if (name.empty() || name == kBaseDomain)
    throw_error<InvalidArgument>("expert name '", name, "' is reserved; choose another");
  if (slot_of(name) >= 0) throw_error<InvalidArgument>("an expert named '", name, "' is already loaded");
  for (const auto& [key, piece] : pieces) {
    const auto [layer, t] = key;
    if (layer < 0 || layer >= config_.num_layers)
      throw_error<InvalidArgument>("expert '", name, "': layer ", layer, " is out of range (the model has ",
                                   config_.num_layers, " layers)");
    const auto [in, out] = dims(t);
    const at::Tensor& a = piece.a;
    const at::Tensor& b = piece.b;
    if (a.dim() != 2 || b.dim() != 2 || a.size(1) != in || b.size(0) != out || b.size(1) != a.size(0)) {
      throw_error<InvalidArgument>("expert '", name, "': layer ", layer, " ", target_name(t), " expects lora_A [r, ",
                                   in, "] and lora_B [", out, ", r], got ", a.sizes(), " and ", b.sizes(),
                                   " (an adapter made for another base model?)");
    }
  }
}

int64_t AdapterTable::claim_slot(const std::string& name) {
  int64_t slot = -1;
  for (size_t i = 0; i < names_.size(); ++i)
    if (names_[i].empty()) {
      slot = static_cast<int64_t>(i);
      break;
    }
  if (slot < 0) {
    slot = slots();
    names_.push_back("");
  }
  names_[slot] = name;
  return slot;
}

void AdapterTable::write_slot(int64_t layer, Target t, int64_t slot, const LoraPiece* piece) {
  Stack& s = stacks_[layer][static_cast<int>(t)];
  if (piece == nullptr && !s.a.defined()) return;
  const auto [in, out] = dims(t);
  const int64_t E = slots();
  const int64_t old_e = s.a.defined() ? s.a.size(0) : 0;
  const int64_t old_r = s.a.defined() ? s.a.size(1) : 0;
  const int64_t r = std::max(old_r, piece != nullptr ? piece->a.size(0) : 0);
  if (old_e != E || old_r != r) {  // grow: new slot and/or larger rank, zero-padded
    const auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    Stack grown{at::zeros({E, r, in}, opts), at::zeros({E, out, r}, opts),
                at::zeros({E}, at::TensorOptions().dtype(at::kFloat).device(device_))};
    if (old_e > 0) {
      grown.a.narrow(0, 0, old_e).narrow(1, 0, old_r).copy_(s.a);
      grown.b.narrow(0, 0, old_e).narrow(2, 0, old_r).copy_(s.b);
      grown.scales.narrow(0, 0, old_e).copy_(s.scales);
    }
    s = grown;
  } else {  // same shape: copy before writing, so the old table stays as it was
    s = Stack{s.a.clone(), s.b.clone(), s.scales.clone()};
  }
  s.a[slot].zero_();
  s.b[slot].zero_();
  s.scales[slot] = 0.0;
  if (piece != nullptr) {
    const int64_t pr = piece->a.size(0);
    s.a[slot].narrow(0, 0, pr).copy_(piece->a);
    s.b[slot].narrow(1, 0, pr).copy_(piece->b);
    s.scales[slot] = piece->scale;
  }
}

std::shared_ptr<AdapterTable> AdapterTable::with_name(int64_t slot, const std::string& name) const {
  auto next = std::make_shared<AdapterTable>(*this);
  if (slot >= 0 && slot < slots()) next->names_[slot] = name;
  return next;
}

std::shared_ptr<AdapterTable> AdapterTable::without_slot(int64_t slot) const {
  auto next = std::make_shared<AdapterTable>(*this);
  if (slot < 0 || slot >= slots()) return next;
  next->names_[slot].clear();
  for (auto& layer : next->stacks_) {
    for (auto& s : layer) {
      if (!s.a.defined()) continue;
      s = Stack{s.a.clone(), s.b.clone(), s.scales.clone()};
      s.a[slot].zero_();
      s.b[slot].zero_();
      s.scales[slot] = 0.0;
    }
  }
  return next;
}

}  // namespace moa::engine
