// One PEFT LoRA adapter folder: adapter_config.json and adapter_model.safetensors, read as
// PEFT would apply them (docs/moa-format.md, "experts/<domain>/"). Every option that
// changes the forward beyond a plain low-rank update is refused by name; every shape is
// checked, against the base model when one is given.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <regex>
#include <set>

#include "engine/moa_dir.h"
#include "engine/moa_format_util.h"

namespace moa::engine {
namespace {

using namespace moa_format;

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
// adapter_config.json: which modules are adapted, with which rank and scale
// -----------------------------------------------------------------------------------------

// Options the engine cannot honour: (key, "is set", what it is).
struct Unsupported {
  const char* key;
  std::function<bool(const json&)> is_set;
  const char* what;
};

const std::vector<Unsupported>& unsupported_options() {
  static const std::vector<Unsupported> table = {
      {"use_dora", is_set, "DoRA (use_dora)"},
      {"bias", [](const json& v) { return !(v.is_string() && v.get<std::string>() == "none"); }, "bias"},
      {"lora_bias", is_set, "lora_bias"},
      {"modules_to_save", is_set, "modules_to_save"},
      {"fan_in_fan_out", is_set, "fan_in_fan_out"},
      {"trainable_token_indices", is_set, "trainable_token_indices"},
      {"target_parameters", is_set, "target_parameters"},
      {"layer_replication", is_set, "layer_replication"},
      {"alora_invocation_tokens", is_set, "aLoRA (alora_invocation_tokens)"},
      {"use_qalora", is_set, "QALoRA (use_qalora)"},
      {"use_bdlora", is_set, "block-diagonal LoRA (use_bdlora)"},
      {"arrow_config", is_set, "arrow_config"},
      {"kasa_config", is_set, "KaSA (kasa_config)"},
      {"velora_config", is_set, "velora_config"},
      {"monteclora_config", is_set, "monteclora_config"},
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

  // Whether PEFT puts a LoRA on module `name` (PEFT 0.21's check_target_module_exists).
  bool targets(const std::string& name) {
    if (const json* ex = get("exclude_modules")) {
      if (ex->is_string() && patterns_.full_match(name, ex->get<std::string>(), "exclude_modules")) return false;
      if (ex->is_array())
        for (const json& e : *ex)
          if (e.is_string() &&
              (name == e.get_ref<const std::string&>() || ends_with_component(name, e.get_ref<const std::string&>())))
            return false;
    }
    const json* t = get("target_modules");
    if (t != nullptr && t->is_string()) return patterns_.full_match(name, t->get<std::string>(), "target_modules");
    if (t == nullptr || !is_set(*t)) return false;
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

  // (r, scale) of module `name`: r and alpha the module's own (rank_pattern / alpha_pattern,
  // else r / lora_alpha); scale alpha / r, or alpha / sqrt(r) with use_rslora.
  std::pair<int64_t, double> rank_and_scale(const std::string& name) {
    const json& r = pattern_value("rank_pattern", name, c_["r"]);
    const json& alpha = pattern_value("alpha_pattern", name, c_["lora_alpha"]);
    if (!r.is_number())
      throw_error<FormatError>(path_, ": ", name, " has rank ", describe(r), "; expected a positive integer");
    if (!alpha.is_number())
      throw_error<FormatError>(path_, ": ", name, " has alpha ", describe(alpha), "; expected a number");
    const double rv = r.get<double>();
    if (!(rv > 0) || rv > 1e15)  // int(r) below, as PEFT does
      throw_error<FormatError>(path_, ": ", name, " has rank ", describe(r), "; expected a positive integer");
    const json* rs = get("use_rslora");
    const double a = alpha.get<double>();
    const double scale = (rs != nullptr && is_set(*rs)) ? a / std::sqrt(rv) : a / rv;
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
      if (v == nullptr || !v->is_number())
        throw_error<FormatError>(path_, ": ", key, " is missing or not a number (", v ? describe(*v) : "None", ")");
    }
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      const json* v = get(key);
      if (v != nullptr && is_set(*v) && !v->is_object())
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
        throw_error<FormatError>(
            path_, ": targets modules the engine does not support: ", join({outside.begin(), outside.end()}),
            " (supported: ", join(moa_target_modules()), ")");
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
    if (lp != nullptr && is_set(*lp)) {
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

  // The first key k of `field` (file order) with re.match(rf"(.*\.)?({k})$", name), as PEFT's
  // get_pattern_key; else `fallback`.
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
// adapter_model.safetensors: the lora_A / lora_B pairs and their shapes
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
    if (key.size() <= kMaxRegexInput && std::regex_search(key, m, lora_re, std::regex_constants::match_continuous)) {
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
    throw_error<FormatError>(path,
                             ": adapts modules the engine does not support: ", join({outside.begin(), outside.end()}),
                             " (supported: ", join(moa_target_modules()), " in model.layers.N)");
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

// One module's pair: lora_A [r, in], lora_B [out, r] with the config's r, floating point.
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

// One (in, out) per module over the layers, and one hidden size.
void check_consistent_dims(const std::vector<LoraWeights>& targets, const std::string& path) {
  std::map<std::string, std::tuple<int64_t, int64_t, int64_t>> seen;  // module -> (layer, in, out)
  std::map<std::string, int64_t> hidden;
  for (const LoraWeights& w : targets) {
    const int64_t in = w.lora_a.size(1), out = w.lora_b.size(0);
    auto it = seen.find(w.module);
    if (it != seen.end() && (std::get<1>(it->second) != in || std::get<2>(it->second) != out))
      throw_error<FormatError>(path, ": ", w.module, " is [in=", in, ", out=", out, "] in layer ", w.layer,
                               " but [in=", std::get<1>(it->second), ", out=", std::get<2>(it->second), "] in layer ",
                               std::get<0>(it->second));
    seen.emplace(w.module, std::make_tuple(w.layer, in, out));
    hidden[w.module] = outputs_hidden(w.module) ? out : in;
  }
  std::set<int64_t> sizes;
  std::string listing;
  for (const auto& [m, h] : hidden) {
    sizes.insert(h);
    listing += (listing.empty() ? "" : ", ") + ("'" + m + "': ") + std::to_string(h);
  }
  if (sizes.size() > 1) throw_error<FormatError>(path, ": the modules disagree on the hidden size: {", listing, "}");
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

// Every layer and shape against the base model, and every targeted module has weights.
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
        throw_error<FormatError>(weights_path, ": has no weights for ", module_name(l, m), ", which ", kAdapterConfig,
                                 " targets");
}

}  // namespace

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
  return outputs_hidden(w.module) ? w.lora_b.size(0) : w.lora_a.size(1);
}

PeftAdapter read_peft_adapter(const std::string& folder_name, const std::string& name, const ModelConfig* base) {
  const fs::path folder(folder_name);
  if (!is_dir(folder)) throw_error<FileNotFound>(folder_name, ": no such PEFT adapter folder");
  const std::string config_path = (folder / kAdapterConfig).string();
  const std::string weights_path = (folder / kAdapterWeights).string();
  json raw = parse_json_text<json>(read_text_file(config_path), config_path);  // keeps the key order
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
  // Layer, then module order; each pair checked against the config.
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
    const at::Tensor lora_a = file->view(pair.a), lora_b = file->view(pair.b);
    for (const auto& [key, t] : {std::pair{pair.a, lora_a}, std::pair{pair.b, lora_b}}) {
      const std::string bad = non_finite_summary(t);
      if (!bad.empty())
        throw_error<FormatError>(weights_path, ": tensor '", key, "' has non-finite values (", bad, ")");
    }
    adapter.targets.push_back({layer, moa_target_modules()[module], lora_a, lora_b, static_cast<float>(scale)});
    adapter.scales.push_back(scale);
    adapter.rank = std::max(adapter.rank, r);
  }
  if (adapter.targets.empty()) throw_error<FormatError>(weights_path, ": holds no LoRA weights");
  check_consistent_dims(adapter.targets, weights_path);
  if (base != nullptr) check_against_base(config, adapter.targets, *base, folder_name, weights_path);
  return adapter;
}

std::string non_finite_summary(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0 || at::isfinite(t).all().item<bool>()) return "";
  const int64_t nan = at::isnan(t).sum().item<int64_t>();
  const int64_t inf = at::isinf(t).sum().item<int64_t>();
  return std::to_string(nan) + " NaN, " + std::to_string(inf) + " inf";
}

}  // namespace moa::engine
