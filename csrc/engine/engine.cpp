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
#include <mutex>
#include <random>
#include <unordered_map>

#include "engine/config.h"
#include "engine/model.h"
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
};

bool ends_with(const std::vector<int64_t>& ids, const std::vector<int64_t>& tail) {
  return tail.size() <= ids.size() && std::equal(tail.rbegin(), tail.rend(), ids.rbegin());
}

}  // namespace



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

  void validate(const GenerationRequest& r) const;
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
}

void Engine::Impl::finish(Sequence& s, FinishReason reason, std::vector<StepEvent>& events, int64_t token) {
  events.push_back({s.id, token, true, reason});
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
  for (auto& s : slots) {
    if (!s) continue;
    batch.tokens.push_back(s->generated.back());
    batch.seqs.push_back({s->slot, s->cached, 1});
    order.push_back(s);
  }
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
    batch.tokens.insert(batch.tokens.end(), s->request.prompt.begin(), s->request.prompt.end());
    batch.seqs.push_back({slot, 0, n});
    order.push_back(s);
  }
  if (order.empty()) return events;

  const at::Tensor logits = model->forward(batch, &cache);  // [S, V] float32
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
      events.push_back({s.id, token, false, FinishReason::kLength});
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
  return impl_->waiting.empty() &&
         std::none_of(impl_->slots.begin(), impl_->slots.end(), [](const auto& s) { return bool(s); });
}

std::vector<GenerationResult> Engine::generate(const std::vector<GenerationRequest>& requests,
                                               const TokenCallback& on_token) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  for (const auto& r : requests) impl_->validate(r);  // all or nothing
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

at::Tensor Engine::forward(const at::Tensor& input_ids) {
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
  at::Tensor ids = input_ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= c.vocab_size)
    throw_error<InvalidArgument>("input_ids: token ids must be in [0, ", c.vocab_size, "), got values in [", lo,
                                 ", ", hi, "]");
  engine::Batch batch;
  batch.all_logits = true;
  batch.tokens.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + B * T);
  for (int64_t b = 0; b < B; ++b) batch.seqs.push_back({-1, 0, T});
  return impl_->model->forward(batch, nullptr).view({B, T, c.vocab_size});
}

}  // namespace moa
