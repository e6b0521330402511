// moa::Engine (include/moa/engine.h): loading, the scheduler (continuous batching over
// KV-cache slots) and the generate / step loop.
//
// A step admits waiting requests into free slots (up to max_prefill_tokens of prompt),
// then runs ONE forward over the new prompts and one token of every running sequence,
// samples a token per sequence, and applies the stop rules. A finished sequence frees
// its slot, which the next waiting request takes at the next step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <random>
#include <unordered_map>

#include "engine/config.h"
#include "engine/model.h"
#include "engine/moa_dir.h"
#include "engine/sampler.h"
#include "engine/weights.h"
#include "moa/engine.h"

namespace moa {

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "unknown";
}

namespace {

at::ScalarType resolve_dtype(const std::string& name, const ModelConfig& c,
                             const std::string& device) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") {
    if (device == "cpu")
      throw_error<InvalidArgument>("dtype 'float16' is supported on CUDA only; on CPU use 'float32' or 'bfloat16'");
    return at::kHalf;
  }
  if (name == "auto") {
    // The checkpoint's dtype; float16 checkpoints run in float32 on CPU.
    if (c.torch_dtype == "bfloat16") return at::kBFloat16;
    if (c.torch_dtype == "float16" && device != "cpu") return at::kHalf;
    return at::kFloat;
  }
  throw_error<InvalidArgument>("dtype '", name, "' is not supported (expected auto, float32, bfloat16 or float16)");
}

struct Sequence {
  int64_t id = 0;
  GenerationRequest request;
  engine::Rng rng;
  int64_t slot = -1;
  int64_t cached = 0;  // tokens in the slot's KV cache
  std::vector<int64_t> generated;
  bool cancel = false;
  // Experts: the slot per layer (fixed at submit for a named domain, at prefill when
  // routed), or empty for the base model.
  std::vector<int64_t> experts;
  std::string routing;           // "" (not routed), "per_layer", "last" or "vote"
  std::vector<float> router_probs;  // [num_layers * n_domains] when routed
  bool reported = false;         // routing info sent with the first event
  std::vector<std::string> layer_names;  // the experts' names when they were fixed
};

bool ends_with(const std::vector<int64_t>& ids, const std::vector<int64_t>& tail) {
  return tail.size() <= ids.size() && std::equal(tail.rbegin(), tail.rend(), ids.rbegin());
}

}  // namespace

using engine::Batch;

struct Engine::Impl {
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
  std::string strategy = "last";

  void validate(const GenerationRequest& r) const;
  void check_routing(const std::string& strategy) const;  // "" passes; else a strategy, with a router
  void resolve_domain(Sequence& s) const;
  void publish_adapters(std::shared_ptr<const engine::AdapterTable> table);
  void free_retired();
  void route_first(const std::vector<std::shared_ptr<Sequence>>& seqs, bool per_layer_too = false);
  std::shared_ptr<const RoutingInfo> routing_info(const Sequence& s) const;
  std::vector<std::string> known_domains() const;
  std::vector<StepEvent> step();
  void finish(Sequence& s, FinishReason reason, std::vector<StepEvent>& events, int64_t token);
  void release_all(const std::vector<int64_t>& ids);
};

void Engine::Impl::validate(const GenerationRequest& r) const {
  if (r.prompt.empty()) throw_error<InvalidArgument>("prompt is empty: a request needs at least one token");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= config.vocab_size)
      throw_error<InvalidArgument>("prompt token ", i, " is ", r.prompt[i], ", outside the vocabulary [0, ",
                                   config.vocab_size, ")");
  }
  if (r.max_new_tokens <= 0)
    throw_error<InvalidArgument>("max_new_tokens must be > 0, got ", r.max_new_tokens);
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
  if (total > options.max_seq_len) {
    throw_error<InvalidArgument>("prompt (", r.prompt.size(), " tokens) + max_new_tokens (", r.max_new_tokens,
                                 ") = ", total, " exceeds max_seq_len (", options.max_seq_len, ")");
  }
  const SamplingParams& s = r.sampling;
  if (!(s.temperature >= 0.0f)) throw_error<InvalidArgument>("temperature must be >= 0, got ", s.temperature);
  if (s.top_k < 0) throw_error<InvalidArgument>("top_k must be >= 0 (0: no limit), got ", s.top_k);
  if (!(s.top_p > 0.0f && s.top_p <= 1.0f)) throw_error<InvalidArgument>("top_p must be in (0, 1], got ", s.top_p);
  for (const auto& stop : r.stop_sequences)
    if (stop.empty()) throw_error<InvalidArgument>("stop sequences must not be empty");
  check_routing(r.routing);
}

void Engine::Impl::check_routing(const std::string& strategy) const {
  if (strategy.empty()) return;
  if (strategy != "per_layer" && strategy != "last" && strategy != "vote")
    throw_error<InvalidArgument>("routing '", strategy, "' is not a strategy (per_layer, last, vote)");
  if (router.empty())
    throw_error<InvalidArgument>("routing '", strategy, "' was asked for, but the engine has no router");
}

void Engine::Impl::finish(Sequence& s, FinishReason reason, std::vector<StepEvent>& events, int64_t token) {
  events.push_back({s.id, token, true, reason, s.reported ? nullptr : routing_info(s)});
  s.reported = true;
  if (s.slot >= 0) slots[s.slot].reset();
  s.slot = -1;
}

std::vector<StepEvent> Engine::Impl::step() {
  std::vector<StepEvent> events;
  // Cancellations first: they free slots for this step's admissions.
  for (auto& s : slots)
    if (s && s->cancel) finish(*s, FinishReason::kCancelled, events, -1);
  for (auto it = waiting.begin(); it != waiting.end();) {
    if ((*it)->cancel) {
      finish(**it, FinishReason::kCancelled, events, -1);
      it = waiting.erase(it);
    } else {
      ++it;
    }
  }

  // The batch: one token of every running sequence, then the prompts admitted now.
  engine::Batch batch;
  std::vector<std::shared_ptr<Sequence>> order;
  free_retired();
  for (auto& s : slots) {
    if (!s) continue;
    batch.tokens.push_back(s->generated.back());
    batch.seqs.push_back({s->slot, s->cached, 1, s->experts.empty() ? nullptr : s->experts.data()});
    order.push_back(s);
  }
  std::vector<std::shared_ptr<Sequence>> admitted;
  int64_t budget = options.max_prefill_tokens;
  bool admitted_any = false;
  for (int64_t slot = 0; slot < options.max_batch && !waiting.empty(); ++slot) {
    if (slots[slot]) continue;
    auto s = waiting.front();
    const int64_t n = static_cast<int64_t>(s->request.prompt.size());
    if (admitted_any && n > budget) break;
    waiting.pop_front();
    admitted_any = true;
    budget -= n;
    s->slot = slot;
    slots[slot] = s;
    admitted.push_back(s);
  }
  route_first(admitted);  // "last" / "vote": a routing pass decides all layers up front
  for (auto& s : admitted) {
    batch.tokens.insert(batch.tokens.end(), s->request.prompt.begin(), s->request.prompt.end());
    Batch::Seq seq{s->slot, 0, static_cast<int64_t>(s->request.prompt.size()),
                   s->experts.empty() ? nullptr : s->experts.data()};
    if (s->routing == "per_layer") {
      seq.route = true;
      seq.router_probs = s->router_probs.data();
    }
    batch.seqs.push_back(seq);
    order.push_back(s);
  }
  if (order.empty()) return events;

  const at::Tensor logits = model->forward(batch, &cache);  // [S, V] float32
  for (auto& s : admitted) {  // routed experts are fixed now: keep their names
    if (s->routing.empty()) continue;
    s->layer_names.clear();
    for (int64_t e : s->experts) s->layer_names.push_back(e < 0 ? "base" : adapters->names()[e]);
  }
  const float* lp = logits.data_ptr<float>();
  for (size_t i = 0; i < order.size(); ++i) {
    Sequence& s = *order[i];
    s.cached += batch.seqs[i].len;
    const int64_t token = sampler.sample(lp + i * config.vocab_size, config.vocab_size, s.request.sampling, s.rng);
    s.generated.push_back(token);
    const GenerationRequest& r = s.request;
    bool stop = !r.ignore_eos &&
                std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), token) != config.eos_token_ids.end();
    for (const auto& seq : r.stop_sequences) stop = stop || ends_with(s.generated, seq);
    if (stop) {
      finish(s, FinishReason::kStop, events, token);
    } else if (static_cast<int64_t>(s.generated.size()) >= r.max_new_tokens) {
      finish(s, FinishReason::kLength, events, token);
    } else {
      events.push_back({s.id, token, false, FinishReason::kLength, s.reported ? nullptr : routing_info(s)});
      s.reported = true;
    }
  }
  return events;
}

void Engine::Impl::release_all(const std::vector<int64_t>& ids) {
  for (int64_t id : ids) {
    for (auto& s : slots)
      if (s && s->id == id) s.reset();
    waiting.erase(std::remove_if(waiting.begin(), waiting.end(), [&](const auto& s) { return s->id == id; }),
                  waiting.end());
  }
}

Engine::Engine(const std::string& model_dir, const EngineOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.model_dir = model_dir;
  m.options = options;
  if (options.device != "cpu")
    throw_error<InvalidArgument>("device '", options.device, "' is not supported by this build (supported: cpu)");
  if (options.max_batch <= 0) throw_error<InvalidArgument>("max_batch must be > 0, got ", options.max_batch);
  if (options.max_seq_len <= 1) throw_error<InvalidArgument>("max_seq_len must be > 1, got ", options.max_seq_len);
  if (options.max_prefill_tokens <= 0)
    throw_error<InvalidArgument>("max_prefill_tokens must be > 0, got ", options.max_prefill_tokens);
  m.config = engine::read_model_config(model_dir);
  m.dtype = resolve_dtype(options.dtype, m.config, options.device);
  engine::ModelWeights weights = engine::load_weights(model_dir, m.config, m.dtype, at::Device(options.device));
  m.model = std::make_unique<engine::Model>(m.config, std::move(weights), m.dtype, options.max_seq_len);
  m.cache = m.model->make_cache(options.max_batch, options.max_seq_len);
  m.adapters = std::make_shared<engine::AdapterTable>(m.config, m.dtype);
  m.model->set_adapters(m.adapters);
  m.slots.resize(options.max_batch);
}

Engine::~Engine() = default;

const ModelConfig& Engine::config() const { return impl_->config; }
const EngineOptions& Engine::options() const { return impl_->options; }
at::ScalarType Engine::dtype() const { return impl_->dtype; }
int64_t Engine::weight_bytes() const { return impl_->model->weights().bytes(); }

int64_t Engine::submit(const GenerationRequest& request) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  impl_->validate(request);
  auto s = std::make_shared<Sequence>();
  s->id = impl_->next_id++;
  s->request = request;
  s->rng = engine::Rng(request.sampling.seed ? *request.sampling.seed : std::random_device{}());
  impl_->resolve_domain(*s);
  impl_->waiting.push_back(s);
  return s->id;
}

std::vector<StepEvent> Engine::step() {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  std::vector<StepEvent> events = std::move(impl_->pending);
  impl_->pending.clear();
  for (StepEvent& e : impl_->step()) events.push_back(e);
  return events;
}

void Engine::cancel(int64_t request_id) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  for (auto& s : impl_->slots)
    if (s && s->id == request_id) s->cancel = true;
  for (auto& s : impl_->waiting)
    if (s->id == request_id) s->cancel = true;
}

bool Engine::idle() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  return impl_->waiting.empty() && impl_->pending.empty() &&
         std::none_of(impl_->slots.begin(), impl_->slots.end(), [](const auto& s) { return bool(s); });
}

std::vector<GenerationResult> Engine::generate(const std::vector<GenerationRequest>& requests,
                                               const TokenCallback& on_token) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  for (const auto& r : requests) {  // all or nothing
    impl_->validate(r);
    Sequence probe;
    probe.request = r;
    impl_->resolve_domain(probe);
  }
  std::unordered_map<int64_t, size_t> index;
  std::vector<int64_t> ids;
  for (size_t i = 0; i < requests.size(); ++i) {
    const int64_t id = submit(requests[i]);
    index[id] = i;
    ids.push_back(id);
  }
  std::vector<GenerationResult> results(requests.size());
  size_t remaining = requests.size();
  try {
    while (remaining > 0) {
      for (const StepEvent& e : impl_->step()) {
        auto it = index.find(e.request_id);
        if (it == index.end()) {  // a request submitted through submit(): keep its event
          impl_->pending.push_back(e);
          continue;
        }
        GenerationResult& r = results[it->second];
        if (e.token >= 0) r.token_ids.push_back(e.token);
        if (e.routing) r.routing = *e.routing;
        bool done = e.finished;
        r.finish_reason = e.finish_reason;
        if (!done && on_token && !on_token(it->second, e.token)) {
          impl_->release_all({e.request_id});  // the caller asked to stop here
          r.finish_reason = FinishReason::kStop;
          done = true;
        } else if (done && on_token && e.token >= 0) {
          on_token(it->second, e.token);
        }
        if (done) {
          index.erase(it);
          --remaining;
        }
      }
    }
  } catch (...) {
    impl_->release_all(ids);  // leave the engine clean for the next call
    throw;
  }
  return results;
}

std::vector<std::string> Engine::Impl::known_domains() const {
  std::vector<std::string> out;
  for (int64_t i = 0; i < adapters->slots(); ++i)
    if (!adapters->names()[i].empty() && !retiring.count(i)) out.push_back(adapters->names()[i]);
  return out;
}

void Engine::Impl::resolve_domain(Sequence& s) const {
  const std::string& d = s.request.domain;
  const int64_t L = config.num_layers;
  s.experts.clear();
  s.routing.clear();
  if (d == "base" || (d.empty() && router.empty() && known_domains().empty())) return;
  if (d.empty()) {
    if (router.empty()) {
      std::string known;
      for (const auto& n : known_domains()) known += (known.empty() ? "" : ", ") + n;
      throw_error<InvalidArgument>("the request names no domain and the engine has no router to choose one: "
                                   "name a domain (known: ", known, ") or 'base'");
    }
    s.routing = s.request.routing.empty() ? strategy : s.request.routing;
    if (s.routing != "per_layer" && s.routing != "last" && s.routing != "vote")
      throw_error<InvalidArgument>("routing '", s.routing, "' is not a strategy (per_layer, last, vote)");
    s.experts.assign(L, -1);
    s.router_probs.assign(L * static_cast<int64_t>(router_domains.size()), 0.0f);
    return;
  }
  const int64_t slot = adapters->slot_of(d);
  if (slot < 0 || retiring.count(slot)) {
    std::string known = "base";
    for (const auto& n : known_domains()) known += ", " + n;
    throw_error<InvalidArgument>("unknown domain '", d, "' (known: ", known, ")");
  }
  s.experts.assign(L, slot);
  s.layer_names.assign(L, d);
}

void Engine::Impl::publish_adapters(std::shared_ptr<const engine::AdapterTable> table) {
  adapters = std::move(table);
  model->set_adapters(adapters);
  if (!router.empty()) {
    std::vector<int64_t> slots_of;
    for (const auto& d : router_domains) {
      const int64_t slot = adapters->slot_of(d);
      slots_of.push_back(slot >= 0 && !retiring.count(slot) ? slot : -1);
    }
    model->set_router(router, slots_of);
  }
}

void Engine::Impl::free_retired() {
  if (retiring.empty()) return;
  std::set<int64_t> used;
  auto mark = [&](const std::shared_ptr<Sequence>& s) {
    if (s)
      for (int64_t e : s->experts) used.insert(e);
  };
  for (const auto& s : slots) mark(s);
  for (const auto& s : waiting) mark(s);
  for (auto it = retiring.begin(); it != retiring.end();) {
    if (used.count(*it)) {
      ++it;
      continue;
    }
    const int64_t slot = *it;
    it = retiring.erase(it);
    publish_adapters(adapters->without_slot(slot));
  }
}

void Engine::Impl::route_first(const std::vector<std::shared_ptr<Sequence>>& seqs, bool per_layer_too) {
  // A routing pass for "last" / "vote": the prompts through every layer with per-layer
  // routing, no KV cache and no logits; then one expert for all layers. per_layer_too: the
  // "per_layer" prompts join the pass too (Engine::route), and keep their per-layer choices,
  // which are the ones their prefill would make.
  Batch pass;
  pass.want_logits = false;
  std::vector<Sequence*> routed;
  for (const auto& s : seqs) {
    const bool collapse = s->routing == "last" || s->routing == "vote";
    if (!collapse && !(per_layer_too && s->routing == "per_layer")) continue;
    pass.tokens.insert(pass.tokens.end(), s->request.prompt.begin(), s->request.prompt.end());
    Batch::Seq seq{-1, 0, static_cast<int64_t>(s->request.prompt.size()), s->experts.data()};
    seq.route = true;
    seq.router_probs = s->router_probs.data();
    pass.seqs.push_back(seq);
    routed.push_back(s.get());
  }
  if (routed.empty()) return;
  model->forward(pass, nullptr);
  for (Sequence* s : routed) {
    if (s->routing == "per_layer") continue;
    int64_t choice = s->experts.back();  // "last"
    if (s->routing == "vote") {  // the most frequent choice; a tie goes to the later layer's
      std::map<int64_t, int64_t> votes;
      for (int64_t e : s->experts) ++votes[e];
      for (auto it = s->experts.rbegin(); it != s->experts.rend(); ++it)
        if (votes[*it] > votes[choice]) choice = *it;
    }
    std::fill(s->experts.begin(), s->experts.end(), choice);
  }
}

std::shared_ptr<const RoutingInfo> Engine::Impl::routing_info(const Sequence& s) const {
  auto info = std::make_shared<RoutingInfo>();
  const int64_t L = config.num_layers;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t e = s.experts.empty() ? -1 : s.experts[l];
    if (!s.layer_names.empty()) {
      info->layer_domains.push_back(s.layer_names[l]);
    } else {
      info->layer_domains.push_back(e < 0 ? "base" : adapters->names()[e]);
    }
  }
  info->domain = info->layer_domains.empty() ? "base" : info->layer_domains[0];
  for (const auto& d : info->layer_domains)
    if (d != info->domain) info->domain = "mixed";
  if (!s.routing.empty()) {
    const int64_t D = static_cast<int64_t>(router_domains.size());
    for (int64_t l = 0; l < L; ++l)
      info->router_probs.emplace_back(s.router_probs.begin() + l * D, s.router_probs.begin() + (l + 1) * D);
  }
  return info;
}

void Engine::add_expert(const std::string& name, const std::vector<LoraWeights>& weights) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  static const std::map<std::string, engine::Target> modules = {
      {"q_proj", engine::Target::q},       {"k_proj", engine::Target::k},   {"v_proj", engine::Target::v},
      {"o_proj", engine::Target::o},       {"gate_proj", engine::Target::gate},
      {"up_proj", engine::Target::up},     {"down_proj", engine::Target::down}};
  engine::LoraPieces pieces;
  for (const LoraWeights& w : weights) {
    auto it = modules.find(w.module);
    if (it == modules.end())
      throw_error<InvalidArgument>("expert '", name, "': module '", w.module,
                                   "' is not a target linear (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
    if (!w.lora_a.defined() || !w.lora_b.defined())
      throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " has no lora_A or lora_B");
    engine::LoraPiece p{w.lora_a.to(at::kCPU, impl_->dtype).contiguous(), w.lora_b.to(at::kCPU, impl_->dtype).contiguous(), w.scale};
    if (!pieces.emplace(std::make_pair(w.layer, it->second), p).second)
      throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " is given twice");
  }
  if (impl_->adapters->slot_of(name) >= 0)
    throw_error<InvalidArgument>("an expert named '", name, "' is already loaded (remove it first)");
  impl_->publish_adapters(impl_->adapters->with_expert(name, pieces));
}

void Engine::remove_expert(const std::string& name) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const int64_t slot = impl_->adapters->slot_of(name);
  if (slot < 0 || impl_->retiring.count(slot)) {
    std::string known;
    for (const auto& n : impl_->known_domains()) known += (known.empty() ? "" : ", ") + n;
    throw_error<InvalidArgument>("unknown expert '", name, "' (loaded: ", known, ")");
  }
  impl_->retiring.insert(slot);
  // Requests using it keep it under a name no request can give, so `name` can be loaded again.
  impl_->publish_adapters(impl_->adapters->with_name(slot, name + " (removed)"));  // routers stop choosing it
  impl_->free_retired();                     // frees it at once if no request uses it
}

std::vector<std::string> Engine::experts() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  return impl_->known_domains();
}

void Engine::set_router(const std::vector<std::string>& domains, const std::vector<at::Tensor>& weights,
                        const std::string& strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const ModelConfig& c = impl_->config;
  if (strategy != "per_layer" && strategy != "last" && strategy != "vote")
    throw_error<InvalidArgument>("router strategy '", strategy, "' is not one of per_layer, last, vote");
  if (domains.empty()) throw_error<InvalidArgument>("a router needs at least one domain");
  if (static_cast<int64_t>(weights.size()) != c.num_layers)
    throw_error<InvalidArgument>("router: expected one matrix per layer (", c.num_layers, "), got ", weights.size());
  std::vector<at::Tensor> router;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    if (w.dim() != 2 || w.size(0) != static_cast<int64_t>(domains.size()) || w.size(1) != c.hidden_size)
      throw_error<InvalidArgument>("router layer ", l, ": expected [", domains.size(), ", ", c.hidden_size,
                                   "] (domains x hidden), got ", w.sizes());
    router.push_back(w.to(at::kCPU, at::kFloat).contiguous());
  }
  impl_->router_domains = domains;
  impl_->router = std::move(router);
  impl_->strategy = strategy;
  impl_->publish_adapters(impl_->adapters);
}

std::vector<std::string> Engine::router_domains() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  return impl_->router_domains;
}

void Engine::load_moa(const std::string& moa_dir, const std::string& strategy) {
  if (!strategy.empty() && strategy != "per_layer" && strategy != "last" && strategy != "vote")
    throw_error<InvalidArgument>("routing strategy '", strategy, "' is not one of per_layer, last, vote");
  // Read and check everything first (the config is fixed after construction).
  const engine::MoaDirectory dir = engine::read_moa_dir(moa_dir, &impl_->config);
  if (!strategy.empty() && dir.router.empty())
    throw_error<InvalidArgument>("routing '", strategy, "' was given, but ", moa_dir, " has no router.safetensors");
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  for (const auto& e : dir.experts)
    if (impl_->adapters->slot_of(e.name) >= 0)
      throw_error<InvalidArgument>(moa_dir, ": an expert named '", e.name, "' is already loaded (remove it first)");
  std::vector<std::string> added;
  try {
    for (const auto& e : dir.experts) {
      add_expert(e.name, e.targets);
      added.push_back(e.name);
    }
    if (!dir.router.empty())
      set_router(dir.config.domains, dir.router, strategy.empty() ? dir.config.strategy : strategy);
  } catch (...) {
    for (const auto& name : added) remove_expert(name);  // unused yet: freed at once
    throw;
  }
}

void Engine::load_expert(const std::string& name, const std::string& peft_dir) {
  if (name.empty()) throw_error<InvalidArgument>("an expert needs a non-empty name");
  const engine::PeftAdapter adapter = engine::read_peft_adapter(peft_dir, name, &impl_->config);
  add_expert(name, adapter.targets);
}

at::Tensor Engine::forward(const at::Tensor& input_ids) { return forward(input_ids, {}, nullptr); }

std::vector<RoutingInfo> Engine::route(const std::vector<std::vector<int64_t>>& prompts, const std::string& strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const ModelConfig& c = impl_->config;
  if (impl_->router.empty()) throw_error<InvalidArgument>("route: the engine has no router");
  impl_->check_routing(strategy);
  if (prompts.empty()) throw_error<InvalidArgument>("route: no prompts");
  std::vector<std::shared_ptr<Sequence>> rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& prompt = prompts[i];
    if (prompt.empty()) throw_error<InvalidArgument>("prompt ", i, " is empty: routing needs at least one token");
    if (static_cast<int64_t>(prompt.size()) > impl_->options.max_seq_len)
      throw_error<InvalidArgument>("prompt ", i, " (", prompt.size(), " tokens) exceeds max_seq_len (",
                                   impl_->options.max_seq_len, ")");
    for (int64_t t : prompt)
      if (t < 0 || t >= c.vocab_size)
        throw_error<InvalidArgument>("prompt ", i, ": token id ", t, " is not in [0, ", c.vocab_size, ")");
    auto s = std::make_shared<Sequence>();
    s->request.prompt = prompt;
    s->request.routing = strategy;
    impl_->resolve_domain(*s);
    rows.push_back(s);
  }
  // One routing pass per group of at most max_prefill_tokens prompt tokens (at least one prompt).
  std::vector<RoutingInfo> out;
  for (size_t begin = 0; begin < rows.size();) {
    size_t end = begin;
    int64_t tokens = 0;
    while (end < rows.size() && (end == begin || tokens + static_cast<int64_t>(rows[end]->request.prompt.size()) <=
                                                      impl_->options.max_prefill_tokens)) {
      tokens += static_cast<int64_t>(rows[end]->request.prompt.size());
      ++end;
    }
    std::vector<std::shared_ptr<Sequence>> group(rows.begin() + begin, rows.begin() + end);
    impl_->route_first(group, /*per_layer_too=*/true);
    for (const auto& s : group) out.push_back(*impl_->routing_info(*s));
    begin = end;
  }
  return out;
}

at::Tensor Engine::forward(const at::Tensor& input_ids, const std::vector<std::string>& domains,
                           std::vector<RoutingInfo>* routing, const std::vector<int64_t>& route_lens,
                           const std::string& strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const ModelConfig& c = impl_->config;
  if (input_ids.dim() != 2)
    throw_error<InvalidArgument>("input_ids: expected [B, T], got a ", input_ids.dim(), "-D tensor");
  if (at::isFloatingType(input_ids.scalar_type()) || input_ids.scalar_type() == at::kBool)
    throw_error<InvalidArgument>("input_ids: expected an integer tensor, got ", input_ids.scalar_type());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (T == 0 || B == 0) throw_error<InvalidArgument>("input_ids: expected B > 0 and T > 0, got [", B, ", ", T, "]");
  if (T > impl_->options.max_seq_len)
    throw_error<InvalidArgument>("input_ids: T = ", T, " exceeds max_seq_len (", impl_->options.max_seq_len, ")");
  if (!domains.empty() && domains.size() != 1 && static_cast<int64_t>(domains.size()) != B)
    throw_error<InvalidArgument>("domain: expected one value or one per sequence (", B, "), got ", domains.size());
  if (!route_lens.empty() && route_lens.size() != 1 && static_cast<int64_t>(route_lens.size()) != B)
    throw_error<InvalidArgument>("route_len: expected one value or one per sequence (", B, "), got ", route_lens.size());
  std::vector<int64_t> pooled(B, T);  // tokens each row is routed over
  for (int64_t b = 0; b < B && !route_lens.empty(); ++b) {
    const int64_t n = route_lens[route_lens.size() == 1 ? 0 : b];
    if (n < 0) throw_error<InvalidArgument>("route_len: expected values >= 0, got ", n);
    if (n > 0 && n < T) pooled[b] = n;
  }
  impl_->check_routing(strategy);
  at::Tensor ids = input_ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= c.vocab_size)
    throw_error<InvalidArgument>("input_ids: token ids must be in [0, ", c.vocab_size, "), got values in [", lo,
                                 ", ", hi, "]");
  const int64_t* p = ids.data_ptr<int64_t>();
  // Each row is served like a request: its domain resolved, routed over its first
  // pooled[b] tokens (the routing pass of "last" / "vote" sees only those).
  std::vector<std::shared_ptr<Sequence>> rows;
  for (int64_t b = 0; b < B; ++b) {
    auto s = std::make_shared<Sequence>();
    s->request.prompt.assign(p + b * T, p + b * T + pooled[b]);
    s->request.domain = domains.empty() ? "" : domains[domains.size() == 1 ? 0 : b];
    s->request.routing = strategy;
    impl_->resolve_domain(*s);
    rows.push_back(s);
  }
  impl_->route_first(rows);
  engine::Batch batch;
  batch.all_logits = true;
  batch.tokens.assign(p, p + B * T);
  for (size_t b = 0; b < rows.size(); ++b) {
    auto& s = rows[b];
    engine::Batch::Seq seq{-1, 0, T, s->experts.empty() ? nullptr : s->experts.data()};
    if (s->routing == "per_layer") {
      seq.route = true;
      seq.router_probs = s->router_probs.data();
      seq.route_len = pooled[b];
    }
    batch.seqs.push_back(seq);
  }
  at::Tensor logits = impl_->model->forward(batch, nullptr).view({B, T, c.vocab_size});
  if (routing != nullptr) {
    routing->clear();
    for (auto& s : rows) routing->push_back(*impl_->routing_info(*s));
  }
  return logits;
}

}  // namespace moa
