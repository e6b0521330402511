// A short description of a JSON value for error messages. nlohmann's dump() recurses over
// nesting (a hostile file nested 100k deep overflows the stack), so containers are only
// described, never printed; scalars are printed and cut at 80 characters.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace moa::engine {

inline std::string describe_json(const nlohmann::json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " items";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

}  // namespace moa::engine
