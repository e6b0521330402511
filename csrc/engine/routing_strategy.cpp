// The routing strategies' names (include/moa/routing_strategy.h): the one table that maps
// names to RoutingStrategy values and back, and the one message for a name not in it.
#include "moa/routing_strategy.h"

#include <array>
#include <string>
#include <utility>

namespace moa {
namespace {

constexpr std::array<std::pair<RoutingStrategy, const char*>, 3> kNames = {{
    {RoutingStrategy::kPerLayer, "per_layer"},
    {RoutingStrategy::kLast, "last"},
    {RoutingStrategy::kVote, "vote"},
}};

}  // namespace

const char* to_string(RoutingStrategy strategy) {
  for (const auto& [value, name] : kNames)
    if (value == strategy) return name;
  return "unknown";
}

template <typename E>
RoutingStrategy parse_routing_strategy(std::string_view name, std::string_view what) {
  for (const auto& [value, known] : kNames)
    if (name == known) return value;
  std::string valid;
  for (const auto& [value, known] : kNames) valid += (valid.empty() ? "" : ", ") + std::string(known);
  throw_error<E>(what, " '", name, "' is not one of ", valid);
}

template RoutingStrategy parse_routing_strategy<InvalidArgument>(std::string_view, std::string_view);
template RoutingStrategy parse_routing_strategy<FormatError>(std::string_view, std::string_view);

}  // namespace moa
