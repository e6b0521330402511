// The Llama-family forward (see model.h). Per layer, in transformers' order:
//   h += o_proj(attention(rope(q), rope(k), v))       on rms_norm(h)
//   h += down_proj(silu(gate) * up)                     on rms_norm(h)
// q/k/v and gate/up are single fused GEMMs; each target linear then passes its block
// of columns through adapt(), the LoRA hook.
#include "engine/model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/dispatch.h"
#include "engine/linear.h"
#include "kernels/cpu/transformer_cpu.h"
#include "moa/ops.h"

namespace moa::engine {

at::Tensor make_rope_table(const ModelConfig& c, int64_t max_positions) {
  // inv_freq, cos and sin exactly as transformers' default / llama3 rope init (float32).
  const int64_t D = c.head_dim;
  at::Tensor exponent = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<double>(D);
  at::Tensor inv_freq = 1.0 / at::pow(c.rope_theta, exponent);
  if (c.rope_llama3_factor > 0) {
    const double factor = c.rope_llama3_factor;
    const double low = c.rope_llama3_low_freq_factor, high = c.rope_llama3_high_freq_factor;
    const double old_len = static_cast<double>(c.rope_llama3_original_max_position);
    const double low_wavelen = old_len / low, high_wavelen = old_len / high;
    at::Tensor wavelen = 2 * M_PI / inv_freq;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / factor, inv_freq);
    at::Tensor smooth = (old_len / wavelen - low) / (high - low);
    at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
    at::Tensor medium = at::logical_not(wavelen < high_wavelen) & at::logical_not(wavelen > low_wavelen);
    inv_freq = at::where(medium, smoothed, scaled);
  }
  at::Tensor pos = at::arange(max_positions, at::kLong).to(at::kFloat);
  at::Tensor freqs = at::outer(pos, inv_freq);  // [P, D/2]
  return at::cat({freqs.cos(), freqs.sin()}, 1).contiguous();
}

Model::Model(ModelConfig config, ModelWeights weights, at::ScalarType dtype, int64_t max_positions)
    : config_(std::move(config)), weights_(std::move(weights)), dtype_(dtype), max_positions_(max_positions),
      rope_table_(make_rope_table(config_, max_positions)), adapters_(std::make_shared<AdapterTable>(config_, dtype)) {}

void Model::set_router(std::vector<at::Tensor> router, std::vector<int64_t> domain_slots) {
  router_ = std::move(router);
  router_slots_ = std::move(domain_slots);
}

KvCache Model::make_cache(int64_t slots, int64_t capacity) const {
  KvCache cache;
  cache.slots = slots;
  cache.capacity = capacity;
  const auto opts = weights_.final_norm.options();
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    // Never read before written, so left uninitialised (and untouched pages cost nothing).
    cache.k.push_back(at::empty({slots, config_.num_kv_heads, capacity, config_.head_dim}, opts));
    cache.v.push_back(at::empty({slots, config_.num_kv_heads, capacity, config_.head_dim}, opts));
  }
  return cache;
}

void Model::adapt(int64_t layer, Target target, const at::Tensor& x, const at::Tensor& y, const at::Tensor& ids) const {
  if (!ids.defined()) return;
  const AdapterTable::Stack& s = adapters_->stack(layer, target);
  if (!s.a.defined()) return;
  moa::grouped_lora_add_(y, x, s.a, s.b, ids, s.scales);
}

void Model::route(int64_t layer, const at::Tensor& xn, const Batch& batch) const {
  const int64_t D = router_domains();
  int64_t row = 0;
  for (const Batch::Seq& sq : batch.seqs) {
    if (sq.route && sq.experts != nullptr) {
      // The mean of the sequence's normed layer input, scored by this layer's router.
      const int64_t n = sq.route_len > 0 ? std::min(sq.route_len, sq.len) : sq.len;
      const at::Tensor pooled = xn.narrow(0, row, n).to(at::kFloat).mean(0);                 // [H]
      const at::Tensor probs = at::softmax(at::mv(router_[layer], pooled), 0).contiguous();  // [D]
      const float* p = probs.data_ptr<float>();
      int64_t best = -1;
      for (int64_t d = 0; d < D; ++d)
        if (router_slots_[d] >= 0 && (best < 0 || p[d] > p[best])) best = d;
      sq.experts[layer] = best < 0 ? -1 : router_slots_[best];
      if (sq.router_probs != nullptr) std::copy(p, p + D, sq.router_probs + layer * D);
    }
    row += sq.len;
  }
}

at::Tensor Model::layer_expert_ids(int64_t layer, const Batch& batch) const {
  bool any = false;
  for (const Batch::Seq& sq : batch.seqs) any = any || (sq.experts != nullptr && sq.experts[layer] >= 0);
  if (!any) return at::Tensor();
  at::Tensor ids = at::empty({static_cast<int64_t>(batch.tokens.size())}, at::kLong);
  int64_t* p = ids.data_ptr<int64_t>();
  for (const Batch::Seq& sq : batch.seqs) {
    const int64_t e = sq.experts != nullptr ? sq.experts[layer] : -1;
    p = std::fill_n(p, sq.len, e);
  }
  return ids;
}

at::Tensor Model::project(int64_t layer, const at::Tensor& x, const Matrix& w, const at::Tensor& b,
                          std::initializer_list<Target> targets, const at::Tensor& ids) const {
  at::Tensor y = linear(x, w, b);
  const int64_t block = y.size(1) / static_cast<int64_t>(targets.size());
  int64_t offset = 0;
  for (Target t : targets) {
    // q/k/v blocks differ in width under GQA.
    int64_t width = block;
    if (t == Target::q) width = config_.num_heads * config_.head_dim;
    if (t == Target::k || t == Target::v) width = config_.num_kv_heads * config_.head_dim;
    adapt(layer, t, x, y.narrow(1, offset, width), ids);
    offset += width;
  }
  return y;
}

// Keys and values of the sequences that have no slot (scoring): [S, nkv, T, D] per layer.
struct Model::Scratch {
  at::Tensor k, v;
  std::vector<int64_t> index;  // sequence -> row of k / v, or -1
};

void Model::attention_block(int64_t layer, at::Tensor& h, const Batch& batch, const at::Tensor& positions,
                            KvCache* cache, Scratch& scratch, at::Tensor& ids) const {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_.layers[layer];
  const int64_t N = h.size(0), H = c.hidden_size, D = c.head_dim;
  const int64_t Q = c.num_heads * D;
  at::Tensor xn = at::empty_like(h);
  at::Tensor qkv;
  MOA_DISPATCH_ENGINE_TYPES(h.scalar_type(), "moa_attn", [&] {
    using T = scalar_t;
    cpu::rms_norm<T>(h.data_ptr<T>(), H, w.attn_norm.data_ptr<T>(), xn.data_ptr<T>(), H, N, H,
                     static_cast<float>(c.rms_norm_eps));
    if (has_router()) route(layer, xn, batch);
    ids = layer_expert_ids(layer, batch);
    qkv = project(layer, xn, w.wqkv, w.bqkv, {Target::q, Target::k, Target::v}, ids);  // [N, Q + 2 KV]
    T* q = qkv.data_ptr<T>();
    const int64_t ld = qkv.stride(0);
    const int64_t* pos = positions.data_ptr<int64_t>();
    cpu::rope<T>(q, ld, N, c.num_heads, D, pos, rope_table_.data_ptr<float>());
    cpu::rope<T>(q + Q, ld, N, c.num_kv_heads, D, pos, rope_table_.data_ptr<float>());
    // Store the new keys and values, then attend over each sequence's store.
    const std::vector<cpu::AttentionSeq<T>> seqs = store_kv<T>(layer, q, ld, batch, cache, scratch);
    at::Tensor attn = at::empty({N, Q}, h.options());
    attend<T>(layer, q, ld, seqs, batch, cache, scratch, attn.data_ptr<T>());
    h.add_(project(layer, attn, w.wo, at::Tensor(), {Target::o}, ids));
  });
}

template <typename T>
std::vector<cpu::AttentionSeq<T>> Model::store_kv(int64_t layer, const T* qkv, int64_t ld, const Batch& batch,
                                                  KvCache* cache, Scratch& scratch) const {
  const ModelConfig& c = config_;
  const int64_t D = c.head_dim, Q = c.num_heads * D, KV = c.num_kv_heads * D;
  std::vector<cpu::AttentionSeq<T>> seqs(batch.seqs.size());
  int64_t row = 0;
  for (size_t s = 0; s < batch.seqs.size(); ++s) {
    const Batch::Seq& sq = batch.seqs[s];
    T *kbase, *vbase;
    int64_t head_stride, pos_stride;
    if (sq.slot >= 0) {
      const at::Tensor& kc = cache->k[layer];
      kbase = kc.data_ptr<T>() + sq.slot * kc.stride(0);
      vbase = cache->v[layer].data_ptr<T>() + sq.slot * kc.stride(0);
      head_stride = kc.stride(1), pos_stride = kc.stride(2);
    } else {
      const int64_t r = scratch.index[s];
      kbase = scratch.k.data_ptr<T>() + r * scratch.k.stride(0);
      vbase = scratch.v.data_ptr<T>() + r * scratch.k.stride(0);
      head_stride = scratch.k.stride(1), pos_stride = scratch.k.stride(2);
    }
    for (int64_t i = 0; i < sq.len; ++i) {
      const T* src = qkv + (row + i) * ld;
      for (int64_t g = 0; g < c.num_kv_heads; ++g) {
        const int64_t off = g * head_stride + (sq.start + i) * pos_stride;
        std::memcpy(kbase + off, src + Q + g * D, D * sizeof(T));
        std::memcpy(vbase + off, src + Q + KV + g * D, D * sizeof(T));
      }
    }
    seqs[s] = {row, sq.len, sq.start, kbase, vbase};
    row += sq.len;
  }
  return seqs;
}

template <typename T>
void Model::attend(int64_t layer, const T* q, int64_t ld, const std::vector<cpu::AttentionSeq<T>>& seqs,
                   const Batch& batch, const KvCache* cache, const Scratch& scratch, T* out) const {
  const ModelConfig& c = config_;
  const int64_t D = c.head_dim, Q = c.num_heads * D;
  cpu::AttentionShape shape;
  shape.n_heads = c.num_heads;
  shape.n_kv_heads = c.num_kv_heads;
  shape.head_dim = D;
  shape.kv_pos_stride = D;
  shape.window = c.sliding_window;
  shape.scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Slots and scratch share the [.., nkv, capacity, D] layout but not the capacity:
  // attend in two calls when a batch mixes them.
  std::vector<cpu::AttentionSeq<T>> cached, loose;
  for (size_t s = 0; s < seqs.size(); ++s) (batch.seqs[s].slot >= 0 ? cached : loose).push_back(seqs[s]);
  if (!cached.empty()) {
    shape.kv_head_stride = cache->k[layer].stride(1);
    cpu::attention<T>(q, ld, out, Q, cached.data(), cached.size(), shape);
  }
  if (!loose.empty()) {
    shape.kv_head_stride = scratch.k.stride(1);
    cpu::attention<T>(q, ld, out, Q, loose.data(), loose.size(), shape);
  }
}

void Model::mlp_block(int64_t layer, at::Tensor& h, const at::Tensor& ids) const {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_.layers[layer];
  const int64_t N = h.size(0), H = c.hidden_size, I = c.intermediate_size;
  at::Tensor xn = at::empty_like(h);
  at::Tensor act = at::empty({N, I}, h.options());
  MOA_DISPATCH_ENGINE_TYPES(h.scalar_type(), "moa_mlp", [&] {
    using T = scalar_t;
    cpu::rms_norm<T>(h.data_ptr<T>(), H, w.mlp_norm.data_ptr<T>(), xn.data_ptr<T>(), H, N, H,
                     static_cast<float>(c.rms_norm_eps));
    at::Tensor gu = project(layer, xn, w.w_gate_up, at::Tensor(), {Target::gate, Target::up}, ids);
    cpu::silu_mul<T>(gu.data_ptr<T>(), gu.stride(0), act.data_ptr<T>(), I, N, I);
  });
  h.add_(project(layer, act, w.w_down, at::Tensor(), {Target::down}, ids));
}

at::Tensor Model::forward(const Batch& batch, KvCache* cache) const {
  const ModelConfig& c = config_;
  const int64_t N = static_cast<int64_t>(batch.tokens.size());
  const int64_t S = static_cast<int64_t>(batch.seqs.size());
  // Positions of the packed tokens, and the scratch stores of slot-less sequences.
  at::Tensor positions = at::empty({N}, at::kLong);
  Scratch scratch;
  scratch.index.assign(S, -1);
  int64_t loose = 0, longest = 0;
  {
    int64_t* p = positions.data_ptr<int64_t>();
    int64_t row = 0;
    for (int64_t s = 0; s < S; ++s) {
      const Batch::Seq& sq = batch.seqs[s];
      TORCH_CHECK(sq.start + sq.len <= max_positions_, "moa engine: position out of range");
      for (int64_t i = 0; i < sq.len; ++i) p[row++] = sq.start + i;
      if (sq.slot < 0) {
        scratch.index[s] = loose++;
        longest = std::max(longest, sq.start + sq.len);
      }
    }
    TORCH_CHECK(row == N, "moa engine: batch sequences cover ", row, " tokens, expected ", N);
  }
  if (loose > 0) {
    const auto opts = weights_.final_norm.options();
    scratch.k = at::empty({loose, c.num_kv_heads, longest, c.head_dim}, opts);
    scratch.v = at::empty({loose, c.num_kv_heads, longest, c.head_dim}, opts);
  }
  at::Tensor ids = at::from_blob(const_cast<int64_t*>(batch.tokens.data()), {N}, at::kLong);
  at::Tensor h = embedding(weights_.embed, ids, dtype_);  // [N, H]
  for (int64_t l = 0; l < c.num_layers; ++l) {
    at::Tensor ids;  // [N] expert slot per token at this layer, set after routing
    attention_block(l, h, batch, positions, cache, scratch, ids);
    mlp_block(l, h, ids);
  }
  if (!batch.want_logits) return at::Tensor();
  // Final norm and lm_head on the rows that need logits.
  at::Tensor rows = h;
  if (!batch.all_logits) {
    std::vector<int64_t> last(S);
    int64_t row = 0;
    for (int64_t s = 0; s < S; ++s) {
      row += batch.seqs[s].len;
      last[s] = row - 1;
    }
    rows = h.index_select(0, at::tensor(last, at::kLong));
  }
  at::Tensor normed = at::empty_like(rows);
  MOA_DISPATCH_ENGINE_TYPES(h.scalar_type(), "moa_final", [&] {
    using T = scalar_t;
    cpu::rms_norm<T>(rows.data_ptr<T>(), rows.stride(0), weights_.final_norm.data_ptr<T>(), normed.data_ptr<T>(),
                     c.hidden_size, rows.size(0), c.hidden_size, static_cast<float>(c.rms_norm_eps));
  });
  return linear(normed, weights_.lm_head, at::Tensor()).to(at::kFloat);
}

}  // namespace moa::engine
