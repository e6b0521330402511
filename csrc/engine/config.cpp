// config.json -> ModelConfig. Field names and defaults follow transformers'
// LlamaConfig, MistralConfig and Qwen2Config.
#include "engine/config.h"

#include <nlohmann/json.hpp>

#include "engine/json_util.h"

#include <filesystem>
#include <type_traits>

namespace moa::engine {
namespace {

using nlohmann::json;

json parse_json(const std::string& text, const std::string& source) {
  json j = parse_json_text(text, source);
  if (!j.is_object()) throw_error<FormatError>(source, ": expected a JSON object at the top level");
  return j;
}

// A field of the expected JSON type, or the default when absent or null.
template <typename T>
T field(const json& j, const char* name, const std::string& source, T fallback) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return fallback;
  bool ok;
  if constexpr (std::is_same_v<T, bool>) {
    ok = it->is_boolean();
  } else if constexpr (std::is_integral_v<T>) {
    ok = it->is_number_integer();  // 300.5 is not a size
  } else if constexpr (std::is_floating_point_v<T>) {
    ok = it->is_number();
  } else {
    ok = it->is_string();
  }
  if (!ok) throw_error<FormatError>(source, ": field '", name, "' has the wrong type (", describe_json(*it), ")");
  return it->get<T>();
}

template <typename T>
T required(const json& j, const char* name, const std::string& source) {
  if (!j.contains(name) || j[name].is_null()) throw_error<FormatError>(source, ": missing required field '", name, "'");
  return field<T>(j, name, source, T{});
}

int64_t positive(const json& j, const char* name, const std::string& source) {
  const int64_t v = required<int64_t>(j, name, source);
  if (v <= 0) throw_error<FormatError>(source, ": expected '", name, "' > 0, got ", v);
  return v;
}

// eos_token_id may be an int or a list of ints.
std::vector<int64_t> token_ids(const json& j, const char* name, const std::string& source) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return {};
  if (it->is_number_integer()) return {it->get<int64_t>()};
  if (it->is_array()) {
    std::vector<int64_t> ids;
    for (const auto& v : *it) {
      if (!v.is_number_integer())
        throw_error<FormatError>(source, ": field '", name, "' must hold integers, got ", describe_json(*it));
      ids.push_back(v.get<int64_t>());
    }
    return ids;
  }
  throw_error<FormatError>(source, ": field '", name, "' must be an integer or a list, got ", describe_json(*it));
}

void read_rope_scaling(const json& j, const std::string& source, ModelConfig& c) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return;
  if (!it->is_object()) throw_error<FormatError>(source, ": 'rope_scaling' must be an object");
  std::string type = field<std::string>(*it, "rope_type", source, "");
  if (type.empty()) type = field<std::string>(*it, "type", source, "default");
  if (type == "default") return;
  if (type != "llama3")
    throw_error<FormatError>(source, ": rope_scaling type '", type, "' is not supported (supported: default, llama3)");
  c.rope_llama3_factor = required<double>(*it, "factor", source);
  c.rope_llama3_low_freq_factor = field<double>(*it, "low_freq_factor", source, 1.0);
  c.rope_llama3_high_freq_factor = field<double>(*it, "high_freq_factor", source, 4.0);
  c.rope_llama3_original_max_position = field<int64_t>(*it, "original_max_position_embeddings", source, 8192);
  if (c.rope_llama3_factor <= 0 || c.rope_llama3_high_freq_factor <= c.rope_llama3_low_freq_factor)
    throw_error<FormatError>(source, ": invalid llama3 rope_scaling ", describe_json(*it));
}

// transformers 5 nests rope_theta (and the scaling) under "rope_parameters".
void read_rope(const json& j, const std::string& source, ModelConfig& c) {
  c.rope_theta = field<double>(j, "rope_theta", source, 10000.0);
  read_rope_scaling(j, source, c);
  auto it = j.find("rope_parameters");
  if (it != j.end() && it->is_object()) {
    c.rope_theta = field<double>(*it, "rope_theta", source, c.rope_theta);
    json wrapped = {{"rope_scaling", *it}};
    read_rope_scaling(wrapped, source, c);
  }
  if (c.rope_theta <= 0) throw_error<FormatError>(source, ": expected rope_theta > 0");
}

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json(json_text, source);
  ModelConfig c;
  c.model_type = field<std::string>(j, "model_type", source, "");
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2") {
    throw_error<FormatError>(source, ": model_type '", c.model_type,
                             "' is not supported (supported: llama, mistral, qwen2)");
  }
  c.vocab_size = positive(j, "vocab_size", source);
  c.hidden_size = positive(j, "hidden_size", source);
  c.intermediate_size = positive(j, "intermediate_size", source);
  c.num_layers = positive(j, "num_hidden_layers", source);
  c.num_heads = positive(j, "num_attention_heads", source);
  c.num_kv_heads = field<int64_t>(j, "num_key_value_heads", source, c.num_heads);
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    throw_error<FormatError>(source, ": num_attention_heads (", c.num_heads,
                             ") must be a multiple of num_key_value_heads (", c.num_kv_heads, ")");
  }
  c.head_dim = field<int64_t>(j, "head_dim", source, 0);
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0) {
      throw_error<FormatError>(source, ": hidden_size (", c.hidden_size, ") is not a multiple of num_attention_heads (",
                               c.num_heads, ") and head_dim is not given");
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    throw_error<FormatError>(source, ": expected an even head_dim > 0, got ", c.head_dim);
  c.rms_norm_eps = field<double>(j, "rms_norm_eps", source, 1e-6);
  read_rope(j, source, c);
  c.max_position_embeddings = field<int64_t>(j, "max_position_embeddings", source, 0);
  c.tie_word_embeddings = field<bool>(j, "tie_word_embeddings", source, false);
  c.attention_bias = field<bool>(j, "attention_bias", source, c.model_type == "qwen2");
  const std::string act = field<std::string>(j, "hidden_act", source, "silu");
  if (act != "silu") throw_error<FormatError>(source, ": hidden_act '", act, "' is not supported (supported: silu)");
  if (field<bool>(j, "mlp_bias", source, false)) throw_error<FormatError>(source, ": mlp_bias = true is not supported");
  // Sliding-window attention: mistral applies sliding_window when set; qwen2 only with
  // use_sliding_window (and then per layer, which is not supported).
  const int64_t window = field<int64_t>(j, "sliding_window", source, 0);
  if (c.model_type == "mistral") {
    c.sliding_window = window;
  } else if (c.model_type == "qwen2" && field<bool>(j, "use_sliding_window", source, false)) {
    throw_error<FormatError>(source, ": qwen2 with use_sliding_window = true is not supported");
  }
  if (c.sliding_window < 0) throw_error<FormatError>(source, ": expected sliding_window >= 0");
  c.torch_dtype = field<std::string>(j, "torch_dtype", source, "");
  c.torch_dtype = field<std::string>(j, "dtype", source, c.torch_dtype);
  c.eos_token_ids = token_ids(j, "eos_token_id", source);
  const auto bos = token_ids(j, "bos_token_id", source);
  c.bos_token_id = bos.empty() ? -1 : bos[0];
  return c;
}

ModelConfig read_model_config(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  if (!fs::is_directory(dir)) throw_error<FileNotFound>(model_dir, ": no such model folder");
  const fs::path path = dir / "config.json";
  if (!fs::exists(path)) throw_error<FileNotFound>(path.string(), ": missing (a model folder needs config.json)");
  ModelConfig c = parse_model_config(read_text_file(path), path.string());
  // generation_config.json's eos ids take precedence, as in transformers' generate().
  const fs::path gen = dir / "generation_config.json";
  if (fs::exists(gen)) {
    const json g = parse_json(read_text_file(gen), gen.string());
    const auto eos = token_ids(g, "eos_token_id", gen.string());
    if (!eos.empty()) c.eos_token_ids = eos;
  }
  return c;
}

}  // namespace moa::engine
