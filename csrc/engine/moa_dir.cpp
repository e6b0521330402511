// MoA directory reader (see moa_dir.h). Each check mirrors one in moa_engine/moa_format.py
// and says which; the messages follow its wording, so that both readers explain a bad
// directory the same way.
#include "engine/moa_dir.h"

#include "engine/json_util.h"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <regex>
#include <set>

#include "moa/errors.h"

namespace moa::engine {
namespace {

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

// module -> the decoder-layer submodule it lives in (MODULE_PARENT).
const std::vector<std::pair<std::string, std::string>>& module_parents() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"q_proj", "self_attn"}, {"k_proj", "self_attn"}, {"v_proj", "self_attn"}, {"o_proj", "self_attn"},
      {"gate_proj", "mlp"},    {"up_proj", "mlp"},      {"down_proj", "mlp"}};
  return table;
}

// Index of a module in moa_target_modules(), or -1.
int module_index(const std::string& module) {
  const auto& t = module_parents();
  for (size_t i = 0; i < t.size(); ++i)
    if (t[i].first == module) return static_cast<int>(i);
  return -1;
}

std::string module_name(int64_t layer, int module) {
  const auto& [name, parent] = module_parents()[module];
  return detail::concat("model.layers.", layer, ".", parent, ".", name);
}

std::string join(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i] + "'";
  return out + "]";
}

std::string describe(const json& v) { return describe_json(v); }

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "bool";
  if (v.is_number_integer()) return "int";
  if (v.is_number()) return "float";
  if (v.is_string()) return "str";
  if (v.is_array()) return "list";
  return "object";
}

// Python's truth value of a JSON value: false, 0, "", [], {} and null are false.
bool truthy(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0.0;
  if (v.is_string()) return !v.get_ref<const std::string&>().empty();
  return !v.empty();
}

bool is_real_number(const json& v) { return v.is_number(); }  // nlohmann: a bool is not a number

const json* find(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

// is_regular_file / is_directory without throwing (a name too long, a permission): such
// paths are reported as missing.
bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}
bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}
bool path_exists(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}


// Non-negative decimal digits -> int64; nullopt on overflow.
std::optional<int64_t> parse_index(const std::string& digits) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return v;
}

// Regexes from adapter_config.json, compiled once per reader. Throws FormatError naming
// the file and the field for a pattern std::regex cannot take.
class Patterns {
 public:
  explicit Patterns(std::string source) : source_(std::move(source)) {}

  // The regex `pattern`, built around the file's `given` pattern of `field` (named in errors).
  const std::regex& get(const std::string& pattern, const std::string& field, const std::string& given) {
    auto it = cache_.find(pattern);
    if (it != cache_.end()) return it->second;
    if (given.size() > kMaxRegexInput)
      throw_error<FormatError>(source_, ": ", field, " pattern is ", given.size(), " characters long (at most ",
                               kMaxRegexInput, " are supported)");
    try {
      return cache_.emplace(pattern, std::regex(pattern, std::regex::ECMAScript)).first->second;
    } catch (const std::regex_error& e) {
      throw_error<FormatError>(source_, ": ", field, " '", given,
                               "' is not a regex this reader supports (ECMAScript syntax; Python-only "
                               "constructs such as (?P<name>...) are not): ",
                               e.what());
    }
  }

  // re.fullmatch(pattern, s)
  bool full_match(const std::string& s, const std::string& pattern, const std::string& field) {
    const std::regex& re = get(pattern, field, pattern);
    return guarded(field, pattern, [&] { return std::regex_match(s, re); });
  }
  // re.match(pattern, s): anchored at the start only. Returns the groups, or nullopt.
  std::optional<std::smatch> prefix_match(const std::string& s, const std::string& pattern, const std::string& field,
                                          const std::string& given) {
    const std::regex& re = get(pattern, field, given);
    std::smatch m;
    if (guarded(field, given, [&] { return std::regex_search(s, m, re, std::regex_constants::match_continuous); }))
      return m;
    return std::nullopt;
  }

 private:
  template <typename F>
  bool guarded(const std::string& field, const std::string& given, F&& run) {
    try {
      return run();
    } catch (const std::regex_error& e) {  // error_complexity / error_stack while matching
      throw_error<FormatError>(source_, ": ", field, " '", given, "' could not be matched: ", e.what());
    }
  }
  std::string source_;
  std::map<std::string, std::regex> cache_;
};

// -----------------------------------------------------------------------------------------
// moa_config.json (MoAConfig.from_dict)
// -----------------------------------------------------------------------------------------

// _check_keys: unknown fields first, then missing ones.
void check_keys(const json& j, const std::string& prefix, const std::vector<std::string>& allowed) {
  std::vector<std::string> unknown, missing, named;
  for (const auto& [key, value] : j.items())
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) unknown.push_back(prefix + key);
  std::sort(unknown.begin(), unknown.end());
  for (const auto& key : allowed) {
    named.push_back(prefix + key);
    if (!j.contains(key)) missing.push_back(prefix + key);
  }
  if (!unknown.empty()) throw_error<FormatError>("unknown field(s) ", join(unknown), " (allowed: ", join(named), ")");
  if (!missing.empty()) throw_error<FormatError>("missing field(s) ", join(missing));
}

[[noreturn]] void bad_field(const std::string& field, const std::string& expected, const json& got) {
  throw_error<FormatError>("field '", field, "': expected ", expected, ", got ", type_name(got), " ", describe(got));
}

std::string string_field(const json& j, const std::string& field) {
  if (!j.is_string()) bad_field(field, "str", j);
  return j.get<std::string>();
}

// A domain name is a safe folder name, not "base", unique ignoring case (_check_names).
void check_domains(const json& j, std::vector<std::string>& out) {
  if (!j.is_array()) bad_field("domains", "list", j);
  if (j.empty()) throw_error<FormatError>("field 'domains': needs at least one domain");
  std::map<std::string, std::string> seen;  // lower case -> as given
  for (const json& v : j) {
    const std::string name = string_field(v, "domains[]");
    if (name.empty()) throw_error<FormatError>("field 'domains': a domain name is empty");
    bool safe = std::isalnum(static_cast<unsigned char>(name[0])) && (name[0] & 0x80) == 0;
    for (char ch : name) {
      const auto c = static_cast<unsigned char>(ch);
      safe = safe && c < 0x80 && (std::isalnum(c) || c == '_' || c == '.' || c == '-');
    }
    if (!safe)
      throw_error<FormatError>("field 'domains': '", name,
                               "' is not a safe folder name (expected ^[A-Za-z0-9][A-Za-z0-9_.-]*$)");
    std::string lower = name;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower == "base") throw_error<FormatError>("field 'domains': '", name, "' is reserved (it means no expert)");
    if (seen.count(lower))
      throw_error<FormatError>("field 'domains': '", name, "' duplicates '", seen[lower],
                               "' (names are compared ignoring case)");
    seen[lower] = name;
    out.push_back(name);
  }
}

void check_target_modules(const json& j, std::vector<std::string>& out) {
  if (!j.is_array()) bad_field("target_modules", "list", j);
  if (j.empty()) throw_error<FormatError>("field 'target_modules': is empty");
  for (const json& v : j) {
    const std::string m = string_field(v, "target_modules[]");
    if (module_index(m) < 0)
      throw_error<FormatError>("field 'target_modules': '", m, "' is not one of ", join(moa_target_modules()));
    if (std::find(out.begin(), out.end(), m) != out.end())
      throw_error<FormatError>("field 'target_modules': '", m, "' is given twice");
    out.push_back(m);
  }
}

MoaConfig moa_config_from_json(const json& j) {
  if (!j.is_object()) throw_error<FormatError>("expected a JSON object, got ", type_name(j));
  check_keys(j, "", {"format_version", "base_model", "domains", "target_modules", "router", "eta"});
  MoaConfig c;
  const json& version = j["format_version"];
  if (!version.is_number_integer()) bad_field("format_version", "int", version);
  if (version.is_number_unsigned() ? version.get<uint64_t>() > static_cast<uint64_t>(kFormatVersion)
                                   : version.get<int64_t>() > kFormatVersion)
    throw_error<FormatError>("field 'format_version': ", describe(version),
                             " is newer than this moa_engine supports (", kFormatVersion, "); upgrade moa_engine");
  c.format_version = version.get<int64_t>();
  if (c.format_version < 1)
    throw_error<FormatError>("field 'format_version': ", c.format_version, " is not a valid version (>= 1)");
  c.base_model = string_field(j["base_model"], "base_model");
  if (c.base_model.empty()) throw_error<FormatError>("field 'base_model': is empty");
  check_domains(j["domains"], c.domains);
  check_target_modules(j["target_modules"], c.target_modules);
  const json& router = j["router"];
  if (!router.is_object()) bad_field("router", "an object", router);
  check_keys(router, "router.", {"pooling", "strategy"});
  c.pooling = string_field(router["pooling"], "router.pooling");
  c.strategy = string_field(router["strategy"], "router.strategy");
  if (c.pooling != "mean")
    throw_error<FormatError>("field 'router.pooling': '", c.pooling, "' is not supported (expected one of ['mean'])");
  parse_routing_strategy<FormatError>(c.strategy, "field 'router.strategy':");
  const json& eta = j["eta"];
  if (!is_real_number(eta)) bad_field("eta", "int or float", eta);
  c.eta = eta.get<double>();
  if (!std::isfinite(c.eta) || c.eta < 0)
    throw_error<FormatError>("field 'eta': ", describe(eta), " is not a finite number >= 0");
  return c;
}

// -----------------------------------------------------------------------------------------
// adapter_config.json (_check_adapter_config, _is_targeted, _rank_and_scale)
// -----------------------------------------------------------------------------------------

// Options the engine cannot honour: (key, "is set", what it is) as in _UNSUPPORTED.
struct Unsupported {
  const char* key;
  std::function<bool(const json&)> is_set;
  const char* what;
};

const std::vector<Unsupported>& unsupported_options() {
  static const std::vector<Unsupported> table = {
      {"use_dora", truthy, "DoRA (use_dora)"},
      {"bias", [](const json& v) { return !(v.is_string() && v.get<std::string>() == "none"); }, "bias"},
      {"lora_bias", truthy, "lora_bias"},
      {"modules_to_save", truthy, "modules_to_save"},
      {"fan_in_fan_out", truthy, "fan_in_fan_out"},
      {"trainable_token_indices", truthy, "trainable_token_indices"},
      {"target_parameters", truthy, "target_parameters"},
      {"layer_replication", truthy, "layer_replication"},
      {"alora_invocation_tokens", truthy, "aLoRA (alora_invocation_tokens)"},
      {"use_qalora", truthy, "QALoRA (use_qalora)"},
      {"use_bdlora", truthy, "block-diagonal LoRA (use_bdlora)"},
      {"arrow_config", truthy, "arrow_config"},
      {"kasa_config", truthy, "KaSA (kasa_config)"},
      {"velora_config", truthy, "velora_config"},
      {"monteclora_config", truthy, "monteclora_config"},
  };
  return table;
}

class AdapterConfig {
 public:
  AdapterConfig(json config, std::string path) : c_(std::move(config)), path_(std::move(path)), patterns_(path_) {
    check();
  }

  const std::string& path() const { return path_; }
  const json* get(const char* key) const { return find(c_, key); }

  // Whether PEFT puts a LoRA on module `name` (_is_targeted: PEFT 0.21's
  // check_target_module_exists).
  bool targets(const std::string& name) {
    if (const json* ex = get("exclude_modules")) {
      if (ex->is_string() && patterns_.full_match(name, ex->get<std::string>(), "exclude_modules")) return false;
      if (ex->is_array())
        for (const json& e : *ex)
          if (e.is_string() && (name == e.get_ref<const std::string&>() ||
                                ends_with_component(name, e.get_ref<const std::string&>())))
            return false;
    }
    const json* t = get("target_modules");
    if (t != nullptr && t->is_string()) return patterns_.full_match(name, t->get<std::string>(), "target_modules");
    if (t == nullptr || !truthy(*t)) return false;
    if (!t->is_array())
      throw_error<FormatError>(path_, ": target_modules must be a list of module names or a regex string, got ",
                               describe(*t));
    bool suffix = false;
    for (const json& m : *t) {
      if (!m.is_string()) continue;  // refused in check()
      const std::string& s = m.get_ref<const std::string&>();
      if (name == s) return true;
      suffix = suffix || ends_with_component(name, s);
    }
    if (!suffix) return false;
    return in_layers(name);
  }

  // (r, scale) of module `name` (_rank_and_scale).
  std::pair<int64_t, double> rank_and_scale(const std::string& name) {
    const json& r = pattern_value("rank_pattern", name, c_["r"]);
    const json& alpha = pattern_value("alpha_pattern", name, c_["lora_alpha"]);
    if (!is_real_number(r)) throw_error<FormatError>(path_, ": ", name, " has rank ", describe(r), "; expected a positive integer");
    if (!is_real_number(alpha)) throw_error<FormatError>(path_, ": ", name, " has alpha ", describe(alpha), "; expected a number");
    const double rv = r.get<double>();
    if (!(rv > 0) || rv > 1e15)  // int(r) below, as PEFT does
      throw_error<FormatError>(path_, ": ", name, " has rank ", describe(r), "; expected a positive integer");
    const json* rs = get("use_rslora");
    const double a = alpha.get<double>();
    const double scale = (rs != nullptr && truthy(*rs)) ? a / std::sqrt(rv) : a / rv;
    return {static_cast<int64_t>(rv), scale};
  }

 private:
  // name.endswith("." + tail)
  static bool ends_with_component(const std::string& name, const std::string& tail) {
    return name.size() > tail.size() && name[name.size() - tail.size() - 1] == '.' &&
           name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  }

  void check() {
    const json* type = get("peft_type");
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "LORA")
      throw_error<FormatError>(path_, ": peft_type is ", type ? describe(*type) : "missing",
                               "; only 'LORA' adapters are supported");
    for (const Unsupported& u : unsupported_options()) {
      const json* v = get(u.key);
      if (v != nullptr && !v->is_null() && u.is_set(*v))
        throw_error<FormatError>(path_, ": ", u.what, " is not supported (", u.key, "=", describe(*v), ")");
    }
    for (const char* key : {"r", "lora_alpha"}) {
      const json* v = get(key);
      if (v == nullptr || !is_real_number(*v))
        throw_error<FormatError>(path_, ": ", key, " is missing or not a number (", v ? describe(*v) : "None", ")");
    }
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      const json* v = get(key);
      if (v != nullptr && truthy(*v) && !v->is_object())
        throw_error<FormatError>(path_, ": ", key, " is not a JSON object (", describe(*v), ")");
    }
    const json* t = get("target_modules");
    if (t != nullptr && t->is_array()) {
      std::set<std::string> outside;
      for (const json& m : *t) {
        if (!m.is_string())
          throw_error<FormatError>(path_, ": target_modules holds ", describe(m), ", not a module name");
        const std::string& s = m.get_ref<const std::string&>();
        const auto dot = s.rfind('.');
        if (module_index(dot == std::string::npos ? s : s.substr(dot + 1)) < 0) outside.insert(s);
      }
      if (!outside.empty())
        throw_error<FormatError>(path_, ": targets modules the engine does not support: ",
                                 join({outside.begin(), outside.end()}), " (supported: ", join(moa_target_modules()), ")");
    }
  }

  // layers_to_transform / layers_pattern, for a module that matched target_modules.
  bool in_layers(const std::string& name) {
    const json* layers = get("layers_to_transform");
    if (layers == nullptr || layers->is_null() || (layers->is_array() && layers->empty())) return true;
    if (!layers->is_number_integer() && !layers->is_array())
      throw_error<FormatError>(path_, ": layers_to_transform must be an integer or a list of integers, got ",
                               describe(*layers));
    std::optional<std::smatch> match;
    std::vector<std::string> pats;
    const json* lp = get("layers_pattern");
    if (lp != nullptr && truthy(*lp)) {
      if (lp->is_string()) {
        pats.push_back(lp->get<std::string>());
      } else if (lp->is_array()) {
        for (const json& p : *lp) {
          if (!p.is_string()) throw_error<FormatError>(path_, ": layers_pattern holds ", describe(p), ", not a string");
          pats.push_back(p.get<std::string>());
        }
      } else {
        throw_error<FormatError>(path_, ": layers_pattern must be a string or a list of strings, got ", describe(*lp));
      }
      for (const auto& p : pats) {
        match = patterns_.prefix_match(name, "(?:^|.*?\\.)" + p + "\\.(\\d+)\\.", "layers_pattern", p);
        if (match) break;
      }
    } else {
      match = patterns_.prefix_match(name, ".*?\\.[^.]*\\.(\\d+)\\.", "layers_pattern", "(default)");
    }
    if (!match) return false;
    const auto index = parse_index((*match)[match->size() - 1].str());  // the (\d+) group: the last one
    if (!index) return false;
    if (layers->is_number_unsigned()) return layers->get<uint64_t>() == static_cast<uint64_t>(*index);
    if (layers->is_number_integer()) return layers->get<int64_t>() == *index;
    for (const json& l : *layers)
      if (l.is_number() && l.get<double>() == static_cast<double>(*index)) return true;
    return false;
  }

  // _pattern_value: the first key k (file order) with re.match(rf"(.*\.)?({k})$", name).
  const json& pattern_value(const char* field, const std::string& name, const json& fallback) {
    const json* patterns = get(field);
    if (patterns == nullptr || !patterns->is_object()) return fallback;
    for (const auto& [key, value] : patterns->items())
      if (patterns_.prefix_match(name, "(.*\\.)?(" + key + ")$", field, key)) return value;
    return fallback;
  }

  json c_;
  std::string path_;
  Patterns patterns_;
};

// -----------------------------------------------------------------------------------------
// adapter_model.safetensors (_pair_lora_tensors, _scaled_targets, shape checks)
// -----------------------------------------------------------------------------------------

struct Pair {
  std::string a, b;  // tensor names; "" when absent
};
using Pairs = std::map<std::pair<int64_t, int>, Pair>;  // (layer, module index) -> names

// {(layer, module): (lora_A, lora_B)} from the file's keys; refuses any other key.
Pairs pair_lora_tensors(const Checkpoint& file, const std::string& path) {
  static const std::regex key_re(
      R"((?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight)");
  static const std::regex lora_re(R"((?:base_model\.model\.)?(.+?)\.lora_(?:embedding_)?[AB]\b)");
  Pairs pairs;
  std::set<std::string> outside;
  std::vector<std::string> unknown;
  for (const std::string& key : file.names()) {
    std::smatch m;
    if (key.size() <= kMaxRegexInput && std::regex_match(key, m, key_re)) {
      const int module = module_index(m[3].str());
      if (module >= 0 && module_parents()[module].second == m[2].str()) {
        const auto layer = parse_index(m[1].str());
        if (!layer)
          throw_error<FormatError>(path, ": tensor '", key, "' names layer ", m[1].str(), ", which is out of range");
        Pair& p = pairs[{*layer, module}];
        std::string& slot = m[4].str() == "A" ? p.a : p.b;
        if (!slot.empty())
          throw_error<FormatError>(path, ": both '", slot, "' and '", key, "' hold lora_", m[4].str(), " of ",
                                   module_name(*layer, module));
        slot = key;
        continue;
      }
    }
    if (key.size() <= kMaxRegexInput &&
        std::regex_search(key, m, lora_re, std::regex_constants::match_continuous)) {
      const std::string mod = m[1].str();
      const auto dot = mod.rfind('.');
      if (module_index(dot == std::string::npos ? mod : mod.substr(dot + 1)) < 0) {
        outside.insert(mod);
        continue;
      }
    }
    unknown.push_back(key);
  }
  if (!outside.empty())
    throw_error<FormatError>(path, ": adapts modules the engine does not support: ",
                             join({outside.begin(), outside.end()}), " (supported: ", join(moa_target_modules()),
                             " in model.layers.N)");
  if (!unknown.empty()) {
    unknown.resize(std::min<size_t>(unknown.size(), 5));
    for (auto& k : unknown)
      if (k.size() > 120) k = k.substr(0, 117) + "...";
    throw_error<FormatError>(path, ": unexpected tensor(s) ", join(unknown), "; expected only lora_A / lora_B weights");
  }
  for (const auto& [key, p] : pairs) {
    if (p.a.empty() != p.b.empty())
      throw_error<FormatError>(path, ": ", module_name(key.first, key.second), " has lora_", p.a.empty() ? "B" : "A",
                               " but no lora_", p.a.empty() ? "A" : "B");
  }
  return pairs;
}

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// _check_pair_shapes
void check_pair(const TensorRecord& a, const TensorRecord& b, int64_t r, const std::string& name,
                const std::string& path) {
  if (a.shape.size() != 2 || b.shape.size() != 2)
    throw_error<FormatError>(path, ": ", name, ": expected lora_A [r, in] and lora_B [out, r], got ",
                             shape_str(a.shape), " and ", shape_str(b.shape));
  if (a.shape[0] != b.shape[1])
    throw_error<FormatError>(path, ": ", name, ": lora_A ", shape_str(a.shape), " has rank ", a.shape[0],
                             " but lora_B ", shape_str(b.shape), " has rank ", b.shape[1]);
  if (a.shape[0] != r)
    throw_error<FormatError>(path, ": ", name, ": ", kAdapterConfig, " gives rank ", r,
                             " (r / rank_pattern) but lora_A is ", shape_str(a.shape));
  if (!at::isFloatingType(a.dtype) || !at::isFloatingType(b.dtype))
    throw_error<FormatError>(path, ": ", name, ": lora weights are ", a.dtype, " / ", b.dtype,
                             ", expected floating point");
}

// _check_consistent_dims: one (in, out) per module over the layers, one hidden size.
void check_consistent_dims(const std::vector<LoraWeights>& targets, const std::string& path) {
  std::map<std::string, std::tuple<int64_t, int64_t, int64_t>> seen;  // module -> (layer, in, out)
  std::map<std::string, int64_t> hidden;
  for (const LoraWeights& w : targets) {
    const int64_t in = w.lora_a.size(1), out = w.lora_b.size(0);
    auto it = seen.find(w.module);
    if (it != seen.end() && (std::get<1>(it->second) != in || std::get<2>(it->second) != out))
      throw_error<FormatError>(path, ": ", w.module, " is [in=", in, ", out=", out, "] in layer ", w.layer,
                               " but [in=", std::get<1>(it->second), ", out=", std::get<2>(it->second),
                               "] in layer ", std::get<0>(it->second));
    seen.emplace(w.module, std::make_tuple(w.layer, in, out));
    hidden[w.module] = (w.module == "o_proj" || w.module == "down_proj") ? out : in;
  }
  std::set<int64_t> sizes;
  std::string listing;
  for (const auto& [m, h] : hidden) {
    sizes.insert(h);
    listing += (listing.empty() ? "" : ", ") + ("'" + m + "': ") + std::to_string(h);
  }
  if (sizes.size() > 1)
    throw_error<FormatError>(path, ": the modules disagree on the hidden size: {", listing, "}");
}

// (in, out) of a target module (index into moa_target_modules()) of the base model.
std::pair<int64_t, int64_t> base_dims(const ModelConfig& c, int module) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t Q = c.num_heads * c.head_dim, KV = c.num_kv_heads * c.head_dim;
  switch (module) {
    case 0: return {H, Q};   // q_proj
    case 1:                  // k_proj
    case 2: return {H, KV};  // v_proj
    case 3: return {Q, H};   // o_proj
    case 4:                  // gate_proj
    case 5: return {H, I};   // up_proj
    default: return {I, H};  // down_proj
  }
}

// _check_against_base
void check_against_base(AdapterConfig& config, const std::vector<LoraWeights>& targets, const ModelConfig& base,
                        const std::string& folder, const std::string& weights_path) {
  std::set<std::pair<int64_t, int>> present;
  for (const LoraWeights& w : targets) {
    const int module = module_index(w.module);
    present.insert({w.layer, module});
    if (w.layer >= base.num_layers)
      throw_error<FormatError>(folder, ": adapter made for another base: it adapts layer ", w.layer,
                               " but the base model has ", base.num_layers, " layers");
    const auto [in, out] = base_dims(base, module);
    const int64_t r = w.lora_a.size(0);
    if (w.lora_a.size(1) != in || w.lora_b.size(0) != out)
      throw_error<FormatError>(folder, ": adapter made for another base: ", module_name(w.layer, module),
                               " expects lora_A [", r, ", ", in, "] and lora_B [", out, ", ", r, "], got ",
                               shape_str(w.lora_a.sizes()), " and ", shape_str(w.lora_b.sizes()));
  }
  for (int64_t l = 0; l < base.num_layers; ++l)
    for (int m = 0; m < static_cast<int>(module_parents().size()); ++m)
      if (!present.count({l, m}) && config.targets(module_name(l, m)))
        throw_error<FormatError>(weights_path, ": has no weights for ", module_name(l, m), ", which ",
                                 kAdapterConfig, " targets");
}

}  // namespace

// -----------------------------------------------------------------------------------------
// Public functions
// -----------------------------------------------------------------------------------------

const std::vector<std::string>& moa_target_modules() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& [name, parent] : module_parents()) out.push_back(name);
    return out;
  }();
  return names;
}

std::vector<std::string> PeftAdapter::modules() const {
  std::vector<std::string> out;
  for (const auto& m : moa_target_modules())
    if (std::any_of(targets.begin(), targets.end(), [&](const LoraWeights& w) { return w.module == m; }))
      out.push_back(m);
  return out;
}

int64_t PeftAdapter::hidden_size() const {
  if (targets.empty()) return 0;
  const LoraWeights& w = targets.front();
  return (w.module == "o_proj" || w.module == "down_proj") ? w.lora_b.size(0) : w.lora_a.size(1);
}

MoaConfig parse_moa_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_text(json_text, source);
  try {
    return moa_config_from_json(j);
  } catch (const FormatError& e) {
    throw_error<FormatError>(source, ": ", e.what());
  }
}

MoaConfig read_moa_config(const std::string& path) { return parse_moa_config(read_text_file(path), path); }

PeftAdapter read_peft_adapter(const std::string& folder_name, const std::string& name, const ModelConfig* base) {
  const fs::path folder(folder_name);
  if (!is_dir(folder)) throw_error<FileNotFound>(folder_name, ": no such PEFT adapter folder");
  const std::string config_path = (folder / kAdapterConfig).string();
  const std::string weights_path = (folder / kAdapterWeights).string();
  json raw = parse_json_text(read_text_file(config_path), config_path);
  if (!raw.is_object()) throw_error<FormatError>(config_path, ": expected a JSON object, got ", type_name(raw));
  AdapterConfig config(std::move(raw), config_path);
  if (!is_file(weights_path)) {
    std::vector<std::string> others;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(folder, ec)) {
      const std::string f = entry.path().filename().string();
      if (f.rfind("adapter_model.", 0) == 0) others.push_back(f);
    }
    std::sort(others.begin(), others.end());
    throw_error<FileNotFound>(weights_path, ": no such file",
                              others.empty() ? "" : " (found " + join(others) + "; only safetensors is read)");
  }
  PeftAdapter adapter;
  adapter.name = name.empty() ? folder.filename().string() : name;
  auto file = std::make_shared<Checkpoint>(Checkpoint::open_file(weights_path));
  adapter.file = file;
  // _scaled_targets: layer, then module order; each pair checked against the config.
  for (const auto& [key, pair] : pair_lora_tensors(*file, weights_path)) {
    const auto [layer, module] = key;
    const std::string mname = module_name(layer, module);
    if (!config.targets(mname)) {
      const json* t = config.get("target_modules");
      const json* l = config.get("layers_to_transform");
      throw_error<FormatError>(weights_path, ": has weights for ", mname, ", which ", kAdapterConfig,
                               " does not target (target_modules=", t ? describe(*t) : "None",
                               ", layers_to_transform=", l ? describe(*l) : "None", ")");
    }
    const auto [r, scale] = config.rank_and_scale(mname);
    check_pair(file->record(pair.a), file->record(pair.b), r, mname, weights_path);
    adapter.targets.push_back(
        {layer, moa_target_modules()[module], file->view(pair.a), file->view(pair.b), static_cast<float>(scale)});
    adapter.rank = std::max(adapter.rank, r);
  }
  if (adapter.targets.empty()) throw_error<FormatError>(weights_path, ": holds no LoRA weights");
  check_consistent_dims(adapter.targets, weights_path);
  if (base != nullptr) check_against_base(config, adapter.targets, *base, folder_name, weights_path);
  return adapter;
}

std::vector<at::Tensor> read_router(const std::string& path, int64_t n_domains) {
  if (!is_file(path)) throw_error<FileNotFound>(path, ": no such router file");
  const Checkpoint file = Checkpoint::open_file(path);
  static const std::regex key_re(R"(layers\.(\d+)\.weight)");
  std::map<int64_t, std::string> layers;
  for (const std::string& key : file.names()) {
    std::smatch m;
    std::optional<int64_t> layer;
    if (key.size() <= kMaxRegexInput && std::regex_match(key, m, key_re)) layer = parse_index(m[1].str());
    if (!layer) {
      const std::string shown = key.size() > 120 ? key.substr(0, 117) + "..." : key;
      throw_error<FormatError>(path, ": unexpected tensor '", shown, "'; expected only layers.{l}.weight");
    }
    layers[*layer] = key;
  }
  if (layers.empty()) throw_error<FormatError>(path, ": holds no router weights");
  std::vector<at::Tensor> weights;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    if (!layers.count(l)) {
      std::string have;
      for (const auto& [i, key] : layers) have += (have.empty() ? "" : ", ") + std::to_string(i);
      throw_error<FormatError>(path, ": lacks layers.", l, ".weight (has layers [", have, "])");
    }
    const TensorRecord& rec = file.record(layers[l]);
    const TensorRecord& first = file.record(layers[0]);
    if (rec.shape.size() != 2 || !at::isFloatingType(rec.dtype))
      throw_error<FormatError>(path, ": layer ", l, ": expected a floating [n_domains, hidden] tensor, got ", rec.dtype,
                               " ", shape_str(rec.shape));
    if (rec.shape != first.shape)
      throw_error<FormatError>(path, ": layer ", l, " is ", shape_str(rec.shape), " but layer 0 is ",
                               shape_str(first.shape));
    // Owned float32 copies: the engine keeps the routers after the file is closed.
    weights.push_back(file.view(layers[l]).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true));
  }
  if (n_domains >= 0 && weights[0].size(0) != n_domains)
    throw_error<FormatError>(path, ": router has ", weights[0].size(0), " outputs but the MoA dir has ", n_domains,
                             " domains");
  return weights;
}

MoaDirectory read_moa_dir(const std::string& path, const ModelConfig* base) {
  const fs::path dir(path);
  if (!is_dir(dir)) throw_error<FileNotFound>(path, ": no such MoA directory");
  MoaDirectory out;
  out.path = path;
  const std::string config_path = (dir / kConfigFile).string();
  out.config = read_moa_config(config_path);
  for (const auto& domain : out.config.domains) {
    const fs::path folder = dir / kExpertsDir / domain;
    for (const char* file : {kAdapterConfig, kAdapterWeights})
      if (!is_file(folder / file))
        throw_error<FileNotFound>((folder / file).string(), ": missing (domain '", domain, "' of ", config_path, ")");
  }
  const fs::path router_path = dir / kRouterFile;
  if (path_exists(router_path))
    out.router = read_router(router_path.string(), static_cast<int64_t>(out.config.domains.size()));
  for (const auto& domain : out.config.domains)
    out.experts.push_back(read_peft_adapter((dir / kExpertsDir / domain).string(), domain, base));
  // _check_experts: only the config's target modules, one hidden size with the routers.
  for (const PeftAdapter& e : out.experts) {
    std::vector<std::string> outside;
    for (const auto& m : e.modules())
      if (std::find(out.config.target_modules.begin(), out.config.target_modules.end(), m) ==
          out.config.target_modules.end())
        outside.push_back(m);
    if (!outside.empty())
      throw_error<FormatError>(path, ": expert '", e.name, "' adapts ", join(outside),
                               ", not in the MoA config's target_modules ", join(out.config.target_modules));
  }
  std::map<int64_t, std::vector<std::string>> sizes;
  for (const PeftAdapter& e : out.experts) sizes[e.hidden_size()].push_back("'" + e.name + "'");
  if (!out.router.empty()) sizes[out.router[0].size(1)].push_back("router");
  if (sizes.size() > 1) {
    std::string listing;
    for (const auto& [h, names] : sizes)
      for (const auto& n : names) listing += (listing.empty() ? "" : ", ") + n + ": " + std::to_string(h);
    throw_error<FormatError>(path, ": experts and router disagree on the hidden size: {", listing, "}");
  }
  if (base != nullptr && !out.router.empty()) {
    if (static_cast<int64_t>(out.router.size()) != base->num_layers)
      throw_error<FormatError>(router_path.string(), ": router has ", out.router.size(), " layers but the model has ",
                               base->num_layers);
    if (out.router[0].size(1) != base->hidden_size)
      throw_error<FormatError>(router_path.string(), ": router input size is ", out.router[0].size(1),
                               " but the model's hidden size is ", base->hidden_size);
  }
  return out;
}

}  // namespace moa::engine
