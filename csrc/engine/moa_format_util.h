// Helpers shared by the three parts of the MoA-directory reader (moa_config.cpp,
// peft_adapter.cpp, moa_dir.cpp): the format's file names and module table, file tests
// that never throw, and the pieces of its error messages. Internal to csrc/engine/.
// The format itself: docs/moa-format.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <nlohmann/json.hpp>

#include <charconv>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/json_util.h"
#include "moa/errors.h"

namespace moa::engine::moa_format {

namespace fs = std::filesystem;
// adapter_config.json keeps its key order: the first matching rank_pattern key wins.
using json = nlohmann::ordered_json;

constexpr int64_t kFormatVersion = 1;
constexpr const char* kConfigFile = "moa_config.json";
constexpr const char* kExpertsDir = "experts";
constexpr const char* kRouterFile = "router.safetensors";
constexpr const char* kAdapterConfig = "adapter_config.json";
constexpr const char* kAdapterWeights = "adapter_model.safetensors";
// Longest regex (pattern or tensor name) handed to std::regex: libstdc++ matches and
// compiles recursively, so unbounded inputs from a file could exhaust the stack.
constexpr size_t kMaxRegexInput = 1024;

// The modules an expert may adapt, in the format's order, and the decoder-layer
// submodule each lives in.
inline const std::vector<std::pair<std::string, std::string>>& module_parents() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"q_proj", "self_attn"}, {"k_proj", "self_attn"}, {"v_proj", "self_attn"}, {"o_proj", "self_attn"},
      {"gate_proj", "mlp"},    {"up_proj", "mlp"},      {"down_proj", "mlp"}};
  return table;
}

// Index of a module in module_parents(), or -1.
inline int module_index(const std::string& module) {
  const auto& t = module_parents();
  for (size_t i = 0; i < t.size(); ++i)
    if (t[i].first == module) return static_cast<int>(i);
  return -1;
}

// "model.layers.{layer}.{parent}.{module}", as PEFT names the module.
inline std::string module_name(int64_t layer, int module) {
  const auto& [name, parent] = module_parents()[module];
  return detail::concat("model.layers.", layer, ".", parent, ".", name);
}

// Whether the module's output (not its input) is the hidden size.
inline bool outputs_hidden(const std::string& module) { return module == "o_proj" || module == "down_proj"; }

// ['a', 'b'], the list notation of the messages.
inline std::string join(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i] + "'";
  return out + "]";
}

inline std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string describe(const json& v) { return describe_json(v); }

// The JSON type of a value, named as the messages name it.
inline const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "bool";
  if (v.is_number_integer()) return "int";
  if (v.is_number()) return "float";
  if (v.is_string()) return "str";
  if (v.is_array()) return "list";
  return "object";
}

// Whether an option counts as set: anything but null, false, 0, "", [] and {}.
inline bool is_set(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0.0;
  if (v.is_string()) return !v.get_ref<const std::string&>().empty();
  return !v.empty();
}

inline const json* find(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

// is_regular_file / is_directory / exists without throwing (a name too long, a
// permission): such paths are reported as missing.
inline bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}
inline bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}
inline bool path_exists(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}

// Non-negative decimal digits -> int64; nullopt on overflow.
inline std::optional<int64_t> parse_index(const std::string& digits) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return v;
}

}  // namespace moa::engine::moa_format
