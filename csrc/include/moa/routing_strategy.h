// How the routers' per-layer choices become a request's experts (part of moa/engine.h's
// API). A routed request is first passed through every layer's router at prefill; then
//   kPerLayer  each layer keeps its own router's choice;
//   kLast      every layer takes the last layer's choice;
//   kVote      every layer takes the most frequent choice (a tie goes to the later layer's).
// The names are those of moa_config.json's router.strategy and of Python's routing="...".
//
//   moa::RoutingStrategy s = moa::parse_routing_strategy("vote");  // RoutingStrategy::kVote
//   moa::to_string(s);                                             // "vote"
#pragma once

#include <string_view>

#include "moa/errors.h"

namespace moa {

enum class RoutingStrategy {
  kPerLayer,  // "per_layer"
  kLast,      // "last"
  kVote,      // "vote"
};

// "per_layer", "last" or "vote".
const char* to_string(RoutingStrategy strategy);

// The strategy named `name`. Any other name throws E, InvalidArgument for a caller's argument
// or FormatError for a name read from a file, with `what` in front of the one message:
//   "<what> 'top2' is not one of per_layer, last, vote"
template <typename E = InvalidArgument>
RoutingStrategy parse_routing_strategy(std::string_view name, std::string_view what = "routing strategy");

extern template RoutingStrategy parse_routing_strategy<InvalidArgument>(std::string_view, std::string_view);
extern template RoutingStrategy parse_routing_strategy<FormatError>(std::string_view, std::string_view);

}  // namespace moa
