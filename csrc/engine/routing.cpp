// Which experts serve a sequence (include/moa/engine.h, state in engine_impl.h): the
// expert its domain names, none for kBaseDomain, or, for kRoutedDomain, the routers'
// choice under its routing strategy:
//   kPerLayer       each layer's router chooses that layer's expert during the prefill;
//   kLast, kVote    a routing pass over the prompt first (route_first), then one expert
//                   for every layer: the last layer's choice, or the most frequent one.
#include <ATen/ATen.h>

#include <algorithm>
#include <map>

#include "engine/engine_impl.h"

namespace moa {
namespace {

using engine::Batch;
using engine::Sequence;

// One expert for every layer, from the per-layer choices of a routing pass.
int64_t collapse(const std::vector<int64_t>& experts, RoutingStrategy strategy) {
  int64_t choice = experts.back();           // kLast
  if (strategy == RoutingStrategy::kVote) {  // the most frequent choice; a tie goes to the later layer's
    std::map<int64_t, int64_t> votes;
    for (int64_t e : experts) ++votes[e];
    for (auto it = experts.rbegin(); it != experts.rend(); ++it)
      if (votes[*it] > votes[choice]) choice = *it;
  }
  return choice;
}

}  // namespace

void Engine::Impl::check_routing(std::optional<RoutingStrategy> strategy) const {
  if (!strategy) return;
  if (router.empty())
    throw_error<InvalidArgument>("routing '", to_string(*strategy), "' was asked for, but the engine has no router");
}

void Engine::Impl::resolve_domain(Sequence& s) const {
  const std::string& d = s.request.domain;
  const int64_t L = config.num_layers;
  s.experts.clear();
  s.routing.reset();
  if (d == kBaseDomain || (d == kRoutedDomain && router.empty() && known_domains().empty())) return;
  if (d == kRoutedDomain) {
    if (router.empty()) {
      std::string known;
      for (const auto& n : known_domains()) known += (known.empty() ? "" : ", ") + n;
      throw_error<InvalidArgument>("the request names no domain and the engine has no router to choose one: ",
                                   "name a domain (known: ", known, ") or '", kBaseDomain, "'");
    }
    s.routing = s.request.routing.value_or(strategy);
    s.experts.assign(L, -1);
    s.router_probs.assign(L * static_cast<int64_t>(router_domains.size()), 0.0f);
    return;
  }
  const int64_t slot = adapters->slot_of(d);
  if (slot < 0 || retiring.count(slot)) {
    std::string known = kBaseDomain;
    for (const auto& n : known_domains()) known += ", " + n;
    throw_error<InvalidArgument>("unknown domain '", d, "' (known: ", known, ")");
  }
  s.experts.assign(L, slot);
  s.layer_names.assign(L, d);
}

void Engine::Impl::route_first(const std::vector<std::shared_ptr<Sequence>>& seqs, bool per_layer_too) {
  // A routing pass for kLast / kVote: the prompts through every layer with per-layer
  // routing, no KV cache and no logits; then one expert for all layers. per_layer_too: the
  // kPerLayer prompts join the pass too (Engine::route), and keep their per-layer choices,
  // which are the ones their prefill would make.
  Batch pass;
  pass.want_logits = false;
  std::vector<Sequence*> routed;
  for (const auto& s : seqs) {
    if (!s->routing) continue;
    if (*s->routing == RoutingStrategy::kPerLayer && !per_layer_too) continue;
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
    if (*s->routing == RoutingStrategy::kPerLayer) continue;
    std::fill(s->experts.begin(), s->experts.end(), collapse(s->experts, *s->routing));
  }
}

void Engine::Impl::keep_layer_names(Sequence& s) const {
  if (!s.routing) return;
  s.layer_names.clear();
  for (int64_t e : s.experts) s.layer_names.push_back(e < 0 ? kBaseDomain : adapters->names()[e]);
}

std::shared_ptr<const RoutingInfo> Engine::Impl::routing_info(const Sequence& s) const {
  auto info = std::make_shared<RoutingInfo>();
  const int64_t L = config.num_layers;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t e = s.experts.empty() ? -1 : s.experts[l];
    if (!s.layer_names.empty()) {
      info->layer_domains.push_back(s.layer_names[l]);
    } else {
      info->layer_domains.push_back(e < 0 ? kBaseDomain : adapters->names()[e]);
    }
  }
  info->domain = info->layer_domains.empty() ? kBaseDomain : info->layer_domains[0];
  for (const auto& d : info->layer_domains)
    if (d != info->domain) info->domain = kMixedDomain;
  if (s.routing) {
    const int64_t D = static_cast<int64_t>(router_domains.size());
    for (int64_t l = 0; l < L; ++l)
      info->router_probs.emplace_back(s.router_probs.begin() + l * D, s.router_probs.begin() + (l + 1) * D);
  }
  return info;
}

}  // namespace moa
