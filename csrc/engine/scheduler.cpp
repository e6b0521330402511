// moa::Engine's scheduler: continuous batching over KV-cache slots, and the generate /
// step loop on top of it (include/moa/engine.h, state in engine_impl.h).
//
// A step admits waiting requests into free slots (up to max_prefill_tokens of prompt),
// then runs ONE forward over the new prompts and one token of every running sequence,
// samples a token per sequence, and applies the stop rules. A finished sequence frees
// its slot, which the next waiting request takes at the next step.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <unordered_map>

#include "engine/engine_impl.h"

namespace moa {
namespace {

using engine::Batch;
using engine::Sequence;

bool ends_with(const std::vector<int64_t>& ids, const std::vector<int64_t>& tail) {
  return tail.size() <= ids.size() && std::equal(tail.rbegin(), tail.rend(), ids.rbegin());
}

// Whether a logits row holds no NaN or inf: an exponent of all ones, tested on the bits so that
// the loop vectorizes (an OR of integer compares; a float reduction would not without
// -ffast-math). Far cheaper than the lm_head GEMM that made the row.
bool all_finite(const float* row, int64_t n) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, row + j, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// A row of the batch for the sequence's new tokens: `len` of them after `start` cached ones.
Batch::Seq batch_row(Sequence& s, int64_t start, int64_t len) {
  return {s.slot, start, len, s.experts.empty() ? nullptr : s.experts.data()};
}

}  // namespace

// The rows of one step's forward: batch.seqs[i] and batch's tokens belong to order[i].
struct Engine::Impl::StepRows {
  Batch batch;
  std::vector<std::shared_ptr<Sequence>> order;     // running sequences, then admitted ones
  std::vector<std::shared_ptr<Sequence>> admitted;  // the prompts prefilled in this step
};

void Engine::Impl::validate(const GenerationRequest& r) const {
  if (r.prompt.empty()) throw_error<InvalidArgument>("prompt is empty: a request needs at least one token");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= config.vocab_size)
      throw_error<InvalidArgument>("prompt token ", i, " is ", r.prompt[i], ", outside the vocabulary [0, ",
                                   config.vocab_size, ")");
  }
  if (r.max_new_tokens <= 0) throw_error<InvalidArgument>("max_new_tokens must be > 0, got ", r.max_new_tokens);
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

// -----------------------------------------------------------------------------------------
// One step
// -----------------------------------------------------------------------------------------

std::vector<StepEvent> Engine::Impl::step() {
  std::vector<StepEvent> events;
  drop_cancelled(events);  // first: they free slots for this step's admissions
  free_retired();
  StepRows rows;
  add_running(rows);
  admit(rows);
  if (rows.order.empty()) return events;
  const at::Tensor logits = run_forward(rows);
  sample_and_emit(rows, logits, events);
  return events;
}

// Finishes the cancelled sequences, running or waiting.
void Engine::Impl::drop_cancelled(std::vector<StepEvent>& events) {
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
}

// One token of every running sequence: the one it generated last.
void Engine::Impl::add_running(StepRows& rows) const {
  for (auto& s : slots) {
    if (!s) continue;
    rows.batch.tokens.push_back(s->generated.back());
    rows.batch.seqs.push_back(batch_row(*s, s->cached, 1));
    rows.order.push_back(s);
  }
}

// Waiting requests into free slots, in order, while their prompts fit max_prefill_tokens
// (the first always does); their prompts join the batch, routed first where the strategy
// decides all layers up front ("last", "vote").
void Engine::Impl::admit(StepRows& rows) {
  int64_t budget = options.max_prefill_tokens;
  for (int64_t slot = 0; slot < options.max_batch && !waiting.empty(); ++slot) {
    if (slots[slot]) continue;
    auto s = waiting.front();
    const int64_t n = static_cast<int64_t>(s->request.prompt.size());
    if (!rows.admitted.empty() && n > budget) break;
    waiting.pop_front();
    budget -= n;
    s->slot = slot;
    slots[slot] = s;
    rows.admitted.push_back(s);
  }
  route_first(rows.admitted);
  for (auto& s : rows.admitted) {
    const std::vector<int64_t>& prompt = s->request.prompt;
    rows.batch.tokens.insert(rows.batch.tokens.end(), prompt.begin(), prompt.end());
    Batch::Seq seq = batch_row(*s, 0, static_cast<int64_t>(prompt.size()));
    if (s->routing == RoutingStrategy::kPerLayer) {  // routed at each layer during the prefill
      seq.route = true;
      seq.router_probs = s->router_probs.data();
    }
    rows.batch.seqs.push_back(seq);
    rows.order.push_back(s);
  }
}

// The forward over the step's rows: logits [S, V] float32, one row per sequence.
at::Tensor Engine::Impl::run_forward(StepRows& rows) {
  at::Tensor logits = model->forward(rows.batch, &cache);
  for (auto& s : rows.admitted) keep_layer_names(*s);
  return logits;
}

// What failed, and what made it: the experts the request runs with, or the base model.
std::string Engine::Impl::non_finite_message(const Sequence& s) const {
  std::set<std::string> experts;
  for (const std::string& name : s.layer_names)
    if (name != kBaseDomain) experts.insert(name);
  std::string by = "the base model's weights";
  if (!experts.empty()) {
    by = "the expert";
    by += experts.size() > 1 ? "s " : " ";
    for (const std::string& e : experts) by += (by.back() == ' ' ? "'" : ", '") + e + "'";
    by += " or the base model's weights";
  }
  return "non-finite logits (NaN or inf) at generated token " + std::to_string(s.generated.size()) + " of request " +
         std::to_string(s.id) + ": " + by + " overflow or hold NaN; the request is ended, the others go on";
}

// A token per sequence from its logits, then the stop rules: an event per sequence.
void Engine::Impl::sample_and_emit(const StepRows& rows, const at::Tensor& logits, std::vector<StepEvent>& events) {
  const float* lp = logits.data_ptr<float>();
  for (size_t i = 0; i < rows.order.size(); ++i) {
    Sequence& s = *rows.order[i];
    s.cached += rows.batch.seqs[i].len;
    const float* row = lp + i * config.vocab_size;
    if (!all_finite(row, config.vocab_size)) {  // a NaN row would be sampled as token 0: fail the request instead
      finish(s, FinishReason::kError, events, -1, non_finite_message(s));
      continue;
    }
    const int64_t token = sampler.sample(row, config.vocab_size, s.request.sampling, s.rng);
    s.generated.push_back(token);
    if (stops(s, token)) {
      finish(s, FinishReason::kStop, events, token);
    } else if (static_cast<int64_t>(s.generated.size()) >= s.request.max_new_tokens) {
      finish(s, FinishReason::kLength, events, token);
    } else {
      events.push_back({s.id, token, false, FinishReason::kLength, s.reported ? nullptr : routing_info(s)});
      s.reported = true;
    }
  }
}

// An EOS id (unless ignore_eos) or the end of a stop sequence.
bool Engine::Impl::stops(const Sequence& s, int64_t token) const {
  const GenerationRequest& r = s.request;
  bool stop = !r.ignore_eos &&
              std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), token) != config.eos_token_ids.end();
  for (const auto& seq : r.stop_sequences) stop = stop || ends_with(s.generated, seq);
  return stop;
}

void Engine::Impl::finish(Sequence& s, FinishReason reason, std::vector<StepEvent>& events, int64_t token,
                          std::string error) {
  events.push_back({s.id, token, true, reason, s.reported ? nullptr : routing_info(s), std::move(error)});
  s.reported = true;
  const int64_t slot = s.slot;
  s.slot = -1;  // before the reset below, which may free s
  if (slot >= 0) slots[slot].reset();
}

void Engine::Impl::release_all(const std::vector<int64_t>& ids) {
  for (int64_t id : ids) {
    for (auto& s : slots)
      if (s && s->id == id) s.reset();
    waiting.erase(std::remove_if(waiting.begin(), waiting.end(), [&](const auto& s) { return s->id == id; }),
                  waiting.end());
  }
}

// -----------------------------------------------------------------------------------------
// The public step-wise interface, and generate() on top of it
// -----------------------------------------------------------------------------------------

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
        if (!e.error.empty()) r.error = e.error;
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

}  // namespace moa
