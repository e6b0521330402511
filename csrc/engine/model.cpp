// The Llama-family forward (see model.h). Per layer, in transformers' order:
//   h += o_proj(attention(rope(q), rope(k), v))       on rms_norm(h)
//   h += down_proj(silu(gate) * up)                     on rms_norm(h)
// q/k/v and gate/up are single fused GEMMs; each target linear then passes its block
// of columns through adapt(), the LoRA hook.
#include "engine/model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

Model::Model(ModelConfig config, ModelWeights weights, at::ScalarType dtype, int64_t max_positions,
             std::shared_ptr<const Backend> backend)
    : config_(std::move(config)), weights_(std::move(weights)), dtype_(dtype), max_positions_(max_positions),
      rope_table_(make_rope_table(config_, max_positions).to(weights_.final_norm.device())),
      adapters_(std::make_shared<AdapterTable>(config_, dtype, weights_.final_norm.device())),
      backend_(std::move(backend)) {}

void Model::set_router(std::vector<at::Tensor> router, std::vector<int64_t> domain_slots) {
  for (at::Tensor& r : router) r = r.to(device());
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
  backend_->lora_add_(y, x, s.a, s.b, ids, s.scales);
}

void Model::route(int64_t layer, const at::Tensor& xn, const Batch& batch) const {
  const int64_t D = router_domains();
  int64_t row = 0;
  for (const Batch::Seq& sq : batch.seqs) {
    if (sq.route && sq.experts != nullptr) {
      // The mean of the sequence's normed layer input, scored by this layer's router.
      const int64_t n = sq.route_len > 0 ? std::min(sq.route_len, sq.len) : sq.len;
      const at::Tensor pooled = xn.narrow(0, row, n).to(at::kFloat).mean(0);  // [H]
      // The one read back to the host per routed layer: the domain probabilities.
      const at::Tensor probs = at::softmax(at::mv(router_[layer], pooled), 0).to(at::kCPU).contiguous();  // [D]
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
  return ids.to(device());
}

at::Tensor Model::project(int64_t layer, const at::Tensor& x, const Matrix& w, const at::Tensor& b,
                          std::initializer_list<Target> targets, const at::Tensor& ids) const {
  at::Tensor y = backend_->linear(x, w, b);
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

void Model::attention_block(int64_t layer, at::Tensor& h, const Batch& batch, const at::Tensor& positions,
                            const std::vector<SeqSpan>& spans, const KvStores& stores, const ForwardPlan* plan,
                            at::Tensor& ids) const {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_.layers[layer];
  const Backend& be = *backend_;
  const at::Tensor xn = be.rms_norm(h, w.attn_norm, static_cast<float>(c.rms_norm_eps));
  if (has_router()) route(layer, xn, batch);
  ids = layer_expert_ids(layer, batch);
  const at::Tensor qkv = project(layer, xn, w.wqkv, w.bqkv, {Target::q, Target::k, Target::v}, ids);  // [N, Q + 2 KV]
  const AttentionDims dims{c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window};
  be.rope_qk(qkv, dims, positions, rope_table_);
  // Store the new keys and values, then attend over each sequence's store.
  be.store_kv(qkv, dims, spans, stores, plan);
  const at::Tensor attn = be.attention(qkv, dims, spans, stores, plan);  // [N, Q]
  h.add_(project(layer, attn, w.wo, at::Tensor(), {Target::o}, ids));
}

void Model::mlp_block(int64_t layer, at::Tensor& h, const at::Tensor& ids) const {
  const LayerWeights& w = weights_.layers[layer];
  const Backend& be = *backend_;
  const at::Tensor xn = be.rms_norm(h, w.mlp_norm, static_cast<float>(config_.rms_norm_eps));
  const at::Tensor gu = project(layer, xn, w.w_gate_up, at::Tensor(), {Target::gate, Target::up}, ids);
  const at::Tensor act = be.silu_mul(gu);  // [N, I]
  h.add_(project(layer, act, w.w_down, at::Tensor(), {Target::down}, ids));
}

at::Tensor Model::forward(const Batch& batch, KvCache* cache) const {
  const ModelConfig& c = config_;
  const at::Device dev = device();
  const int64_t N = static_cast<int64_t>(batch.tokens.size());
  const int64_t S = static_cast<int64_t>(batch.seqs.size());
  // Positions of the packed tokens; each sequence's span (its rows and its store: a
  // cache slot, or a scratch row for one without a slot), fixed for every layer.
  at::Tensor positions = at::empty({N}, at::kLong);
  std::vector<SeqSpan> spans(S);
  int64_t loose = 0, longest = 0;
  {
    int64_t* p = positions.data_ptr<int64_t>();
    int64_t row = 0;
    for (int64_t s = 0; s < S; ++s) {
      const Batch::Seq& sq = batch.seqs[s];
      TORCH_CHECK(sq.start + sq.len <= max_positions_, "moa engine: position out of range");
      const bool scratch = sq.slot < 0;
      spans[s] = {row, sq.len, sq.start, scratch, scratch ? loose++ : sq.slot};
      if (scratch) longest = std::max(longest, sq.start + sq.len);
      for (int64_t i = 0; i < sq.len; ++i) p[row++] = sq.start + i;
    }
    TORCH_CHECK(row == N, "moa engine: batch sequences cover ", row, " tokens, expected ", N);
  }
  positions = positions.to(dev);
  at::Tensor scratch_k, scratch_v;
  if (loose > 0) {
    const auto opts = weights_.final_norm.options();
    scratch_k = at::empty({loose, c.num_kv_heads, longest, c.head_dim}, opts);
    scratch_v = at::empty({loose, c.num_kv_heads, longest, c.head_dim}, opts);
  }
  const at::Tensor tokens = at::from_blob(const_cast<int64_t*>(batch.tokens.data()), {N}, at::kLong).to(dev);
  at::Tensor h = backend_->embedding(weights_.embed, tokens, dtype_);  // [N, H]
  const auto stores_of = [&](int64_t l) {
    return KvStores{cache != nullptr ? cache->k[l] : at::Tensor(), cache != nullptr ? cache->v[l] : at::Tensor(),
                    scratch_k, scratch_v};
  };
  const std::unique_ptr<ForwardPlan> plan = backend_->plan(spans, stores_of(0));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    at::Tensor ids;  // [N] expert slot per token at this layer, set after routing
    attention_block(l, h, batch, positions, spans, stores_of(l), plan.get(), ids);
    mlp_block(l, h, ids);
  }
  if (!batch.want_logits) return at::Tensor();
  // Final norm and lm_head on the rows that need logits.
  at::Tensor rows = h;
  if (!batch.all_logits) {
    std::vector<int64_t> last(S);
    for (int64_t s = 0; s < S; ++s) last[s] = spans[s].row + spans[s].len - 1;
    rows = h.index_select(0, at::tensor(last, at::kLong).to(dev));
  }
  const at::Tensor normed = backend_->rms_norm(rows, weights_.final_norm, static_cast<float>(c.rms_norm_eps));
  // The logits go to the host's sampler.
  return backend_->linear(normed, weights_.lm_head, at::Tensor()).to(at::kFloat).to(at::kCPU);
}

}  // namespace moa::engine
