// moa::Engine's one-off passes (include/moa/engine.h, state in engine_impl.h): forward()
// scores whole sequences and route() asks the routers alone. Neither takes a KV-cache slot:
// each row is served like a request (its domain resolved, routed as its prefill would be),
// in a batch of its own.
#include <ATen/ATen.h>

#include "engine/engine_impl.h"

namespace moa {
namespace {

using engine::Batch;
using engine::Sequence;

void check_scoring_input(const at::Tensor& input_ids, int64_t max_seq_len) {
  if (input_ids.dim() != 2)
    throw_error<InvalidArgument>("input_ids: expected [B, T], got a ", input_ids.dim(), "-D tensor");
  if (at::isFloatingType(input_ids.scalar_type()) || input_ids.scalar_type() == at::kBool)
    throw_error<InvalidArgument>("input_ids: expected an integer tensor, got ", input_ids.scalar_type());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (T == 0 || B == 0) throw_error<InvalidArgument>("input_ids: expected B > 0 and T > 0, got [", B, ", ", T, "]");
  if (T > max_seq_len) throw_error<InvalidArgument>("input_ids: T = ", T, " exceeds max_seq_len (", max_seq_len, ")");
}

// domains and route_lens: empty, one value for every row, or one per row.
void check_per_row_counts(const std::vector<std::string>& domains, const std::vector<int64_t>& route_lens, int64_t B) {
  if (!domains.empty() && domains.size() != 1 && static_cast<int64_t>(domains.size()) != B)
    throw_error<InvalidArgument>("domain: expected one value or one per sequence (", B, "), got ", domains.size());
  if (!route_lens.empty() && route_lens.size() != 1 && static_cast<int64_t>(route_lens.size()) != B)
    throw_error<InvalidArgument>("route_len: expected one value or one per sequence (", B, "), got ",
                                 route_lens.size());
}

// The tokens each row is routed over: its route_len, where 0 or >= T means the whole row.
std::vector<int64_t> routed_lengths(const std::vector<int64_t>& route_lens, int64_t B, int64_t T) {
  std::vector<int64_t> pooled(B, T);
  for (int64_t b = 0; b < B && !route_lens.empty(); ++b) {
    const int64_t n = route_lens[route_lens.size() == 1 ? 0 : b];
    if (n < 0) throw_error<InvalidArgument>("route_len: expected values >= 0, got ", n);
    if (n > 0 && n < T) pooled[b] = n;
  }
  return pooled;
}

// input_ids as contiguous int64 on the CPU, every id in the vocabulary.
at::Tensor vocabulary_ids(const at::Tensor& input_ids, int64_t vocab_size) {
  at::Tensor ids = input_ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= vocab_size)
    throw_error<InvalidArgument>("input_ids: token ids must be in [0, ", vocab_size, "), got values in [", lo, ", ", hi,
                                 "]");
  return ids;
}

void check_route_prompt(const std::vector<int64_t>& prompt, size_t i, int64_t max_seq_len, int64_t vocab_size) {
  if (prompt.empty()) throw_error<InvalidArgument>("prompt ", i, " is empty: routing needs at least one token");
  if (static_cast<int64_t>(prompt.size()) > max_seq_len)
    throw_error<InvalidArgument>("prompt ", i, " (", prompt.size(), " tokens) exceeds max_seq_len (", max_seq_len, ")");
  for (int64_t t : prompt)
    if (t < 0 || t >= vocab_size)
      throw_error<InvalidArgument>("prompt ", i, ": token id ", t, " is not in [0, ", vocab_size, ")");
}

}  // namespace

at::Tensor Engine::forward(const at::Tensor& input_ids) { return forward(input_ids, {}, nullptr); }

at::Tensor Engine::forward(const at::Tensor& input_ids, const std::vector<std::string>& domains,
                           std::vector<RoutingInfo>* routing, const std::vector<int64_t>& route_lens,
                           std::optional<RoutingStrategy> strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const ModelConfig& c = impl_->config;
  check_scoring_input(input_ids, impl_->options.max_seq_len);
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  check_per_row_counts(domains, route_lens, B);
  const std::vector<int64_t> pooled = routed_lengths(route_lens, B, T);
  impl_->check_routing(strategy);
  const at::Tensor ids = vocabulary_ids(input_ids, c.vocab_size);
  const int64_t* p = ids.data_ptr<int64_t>();
  // Each row is served like a request: its domain resolved, routed over its first
  // pooled[b] tokens (the routing pass of kLast / kVote sees only those).
  std::vector<std::shared_ptr<Sequence>> rows;
  for (int64_t b = 0; b < B; ++b) {
    auto s = std::make_shared<Sequence>();
    s->request.prompt.assign(p + b * T, p + b * T + pooled[b]);
    s->request.domain = domains.empty() ? kRoutedDomain : domains[domains.size() == 1 ? 0 : b];
    s->request.routing = strategy;
    impl_->resolve_domain(*s);
    rows.push_back(s);
  }
  impl_->route_first(rows);
  Batch batch;
  batch.all_logits = true;
  batch.tokens.assign(p, p + B * T);
  for (size_t b = 0; b < rows.size(); ++b) {
    auto& s = rows[b];
    Batch::Seq seq{-1, 0, T, s->experts.empty() ? nullptr : s->experts.data()};
    if (s->routing == RoutingStrategy::kPerLayer) {
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

std::vector<RoutingInfo> Engine::route(const std::vector<std::vector<int64_t>>& prompts,
                                       std::optional<RoutingStrategy> strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  if (impl_->router.empty()) throw_error<InvalidArgument>("route: the engine has no router");
  impl_->check_routing(strategy);
  if (prompts.empty()) throw_error<InvalidArgument>("route: no prompts");
  std::vector<std::shared_ptr<Sequence>> rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    check_route_prompt(prompts[i], i, impl_->options.max_seq_len, impl_->config.vocab_size);
    auto s = std::make_shared<Sequence>();
    s->request.prompt = prompts[i];
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

}  // namespace moa
