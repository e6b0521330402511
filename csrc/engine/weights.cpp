// HF checkpoint -> ModelWeights, driven by one table (see weights.h).
#include "engine/weights.h"

#include <ATen/ATen.h>

#include <functional>

#include "engine/safetensors.h"

namespace moa::engine {
namespace {

// Where a checkpoint tensor goes: a block of rows of one engine tensor.
enum class Part { embed, final_norm, lm_head, attn_norm, wqkv, bqkv, wo, mlp_norm, w_gate_up, w_down };

struct TensorSpec {
  const char* hf_name;  // "{}" stands for the layer index
  Part part;
  int block;  // which block of rows in a fused tensor (q/k/v, gate/up)
};

// The declarative map from HF names to the engine's layout.
constexpr TensorSpec kModelTensors[] = {
    {"model.embed_tokens.weight", Part::embed, 0},
    {"model.norm.weight", Part::final_norm, 0},
    {"lm_head.weight", Part::lm_head, 0},
};
constexpr TensorSpec kLayerTensors[] = {
    {"model.layers.{}.input_layernorm.weight", Part::attn_norm, 0},
    {"model.layers.{}.self_attn.q_proj.weight", Part::wqkv, 0},
    {"model.layers.{}.self_attn.k_proj.weight", Part::wqkv, 1},
    {"model.layers.{}.self_attn.v_proj.weight", Part::wqkv, 2},
    {"model.layers.{}.self_attn.q_proj.bias", Part::bqkv, 0},
    {"model.layers.{}.self_attn.k_proj.bias", Part::bqkv, 1},
    {"model.layers.{}.self_attn.v_proj.bias", Part::bqkv, 2},
    {"model.layers.{}.self_attn.o_proj.weight", Part::wo, 0},
    {"model.layers.{}.post_attention_layernorm.weight", Part::mlp_norm, 0},
    {"model.layers.{}.mlp.gate_proj.weight", Part::w_gate_up, 0},
    {"model.layers.{}.mlp.up_proj.weight", Part::w_gate_up, 1},
    {"model.layers.{}.mlp.down_proj.weight", Part::w_down, 0},
};

// Row counts of each block of a part, and its column count (0: 1-D).
struct Layout {
  std::vector<int64_t> blocks;
  int64_t cols = 0;
};

Layout layout_of(Part part, const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Q = c.num_heads * c.head_dim, KV = c.num_kv_heads * c.head_dim;
  switch (part) {
    case Part::embed:
    case Part::lm_head: return {{V}, H};
    case Part::final_norm:
    case Part::attn_norm:
    case Part::mlp_norm: return {{H}, 0};
    case Part::wqkv: return {{Q, KV, KV}, H};
    case Part::bqkv: return {{Q, KV, KV}, 0};
    case Part::wo: return {{H}, Q};
    case Part::w_gate_up: return {{I, I}, H};
    case Part::w_down: return {{H}, I};
  }
  return {};
}

bool wanted(Part part, const ModelConfig& c) {
  if (part == Part::bqkv) return c.attention_bias;
  if (part == Part::lm_head) return !c.tie_word_embeddings;
  return true;
}

std::string name_for(const char* pattern, int64_t layer) {
  std::string s(pattern);
  const auto at = s.find("{}");
  if (at != std::string::npos) s.replace(at, 2, std::to_string(layer));
  return s;
}

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

at::Tensor& slot(Part part, ModelWeights& w, int64_t layer) {
  switch (part) {
    case Part::embed: return w.embed.dense;
    case Part::final_norm: return w.final_norm;
    case Part::lm_head: return w.lm_head.dense;
    case Part::attn_norm: return w.layers[layer].attn_norm;
    case Part::wqkv: return w.layers[layer].wqkv.dense;
    case Part::bqkv: return w.layers[layer].bqkv;
    case Part::wo: return w.layers[layer].wo.dense;
    case Part::mlp_norm: return w.layers[layer].mlp_norm;
    case Part::w_gate_up: return w.layers[layer].w_gate_up.dense;
    case Part::w_down: return w.layers[layer].w_down.dense;
  }
  throw_error<Error>("unreachable");
}

class Loader {
 public:
  Loader(const std::string& dir, const ModelConfig& c, at::ScalarType dtype, at::Device device)
      : dir_(dir), config_(c), ckpt_(Checkpoint::open(dir)), options_(at::TensorOptions().dtype(dtype).device(device)) {
  }

  // Throws FormatError unless the tensor exists with the shape config.json implies.
  // Run over the whole table before anything is allocated, so a config.json that does
  // not match the checkpoint fails on the first tensor, not in an allocation.
  void check(const TensorSpec& spec, int64_t layer) const {
    if (!wanted(spec.part, config_)) return;
    const std::string name = name_for(spec.hf_name, layer);
    if (!ckpt_.contains(name))
      throw_error<FormatError>(dir_, ": missing tensor '", name, "' (needed by ", config_.model_type,
                               " with this config.json)");
    const TensorRecord& rec = ckpt_.record(name);
    const Layout lay = layout_of(spec.part, config_);
    const int64_t rows = lay.blocks[spec.block];
    const std::vector<int64_t> expected = lay.cols ? std::vector<int64_t>{rows, lay.cols} : std::vector<int64_t>{rows};
    if (rec.shape != expected) {
      throw_error<FormatError>(ckpt_.file_of(name), ": tensor '", name, "' has shape ", shape_str(rec.shape),
                               ", expected ", shape_str(expected), " from config.json");
    }
    if (!at::isFloatingType(rec.dtype))
      throw_error<FormatError>(ckpt_.file_of(name), ": tensor '", name, "' is not floating point");
  }

  // Copies one (checked) checkpoint tensor into its block of the engine tensor, then
  // releases its mapped pages.
  void load(const TensorSpec& spec, int64_t layer, ModelWeights& w) {
    if (!wanted(spec.part, config_)) return;
    const std::string name = name_for(spec.hf_name, layer);
    const Layout lay = layout_of(spec.part, config_);
    at::Tensor& dst = slot(spec.part, w, layer);
    if (!dst.defined()) {
      int64_t rows = 0;
      for (int64_t b : lay.blocks) rows += b;
      dst = lay.cols ? at::empty({rows, lay.cols}, options_) : at::empty({rows}, options_);
    }
    int64_t offset = 0;
    for (int b = 0; b < spec.block; ++b) offset += lay.blocks[b];
    dst.narrow(0, offset, lay.blocks[spec.block]).copy_(ckpt_.view(name));
    ckpt_.release(name);
  }

 private:
  std::string dir_;
  const ModelConfig& config_;
  Checkpoint ckpt_;
  at::TensorOptions options_;
};

}  // namespace

int64_t ModelWeights::bytes() const {
  int64_t total = 0;
  auto add = [&](const at::Tensor& t) {
    if (t.defined()) total += t.numel() * static_cast<int64_t>(t.element_size());
  };
  total += embed.bytes();
  add(final_norm);
  if (!tied) total += lm_head.bytes();
  for (const auto& l : layers) {
    add(l.attn_norm), add(l.bqkv), add(l.mlp_norm);
    total += l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes();
  }
  return total;
}

ModelWeights load_weights(const std::string& model_dir, const ModelConfig& config, at::ScalarType dtype,
                          at::Device device) {
  Loader loader(model_dir, config, dtype, device);
  for (const auto& spec : kModelTensors) loader.check(spec, 0);
  for (int64_t l = 0; l < config.num_layers; ++l)
    for (const auto& spec : kLayerTensors) loader.check(spec, l);
  ModelWeights w;
  w.layers.resize(static_cast<size_t>(config.num_layers));
  for (const auto& spec : kModelTensors) loader.load(spec, 0, w);
  for (int64_t l = 0; l < config.num_layers; ++l)
    for (const auto& spec : kLayerTensors) loader.load(spec, l, w);
  auto shape = [](Matrix& m) { m = Matrix::of(m.dense); };
  shape(w.embed), shape(w.lm_head);
  for (auto& l : w.layers) shape(l.wqkv), shape(l.wo), shape(l.w_gate_up), shape(l.w_down);
  if (config.tie_word_embeddings) w.lm_head = w.embed, w.tied = true;
  return w;
}

}  // namespace moa::engine
