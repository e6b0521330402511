// Test files (see test_files.h).
#include "test_files.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace moa::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kDouble: return "F64";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kInt: return "I32";
    case at::kLong: return "I64";
    default: throw std::invalid_argument("test_files: no safetensors name for this dtype");
  }
}

// N(0, std^2) float32 tensor (mean added), drawn from `rng`.
at::Tensor random_tensor(std::mt19937_64& rng, std::vector<int64_t> shape, float std, float mean = 0.0f) {
  at::Tensor t = at::empty(shape, at::kFloat);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = mean + std * normal(rng);
  return t;
}

// (parent, module, in, out) of the tiny model's target linears.
struct Target {
  const char* parent;
  const char* module;
  int64_t in, out;
};
const std::vector<Target>& tiny_targets() {
  static const std::vector<Target> t = {{"self_attn", "q_proj", 16, 16}, {"self_attn", "k_proj", 16, 8},
                                        {"self_attn", "v_proj", 16, 8},  {"self_attn", "o_proj", 16, 16},
                                        {"mlp", "gate_proj", 16, 24},    {"mlp", "up_proj", 16, 24},
                                        {"mlp", "down_proj", 24, 16}};
  return t;
}

void write_json(const std::string& path, const ordered_json& j) { write_file(path, j.dump(2)); }

// One PEFT expert folder: rank r for every module in `modules`, low_rank for low_rank_module.
void write_expert(const std::string& dir, std::mt19937_64& rng, const ordered_json& config,
                  const std::vector<std::string>& modules, int64_t r, const std::string& low_rank_module,
                  int64_t low_rank) {
  write_json(dir + "/adapter_config.json", config);
  NamedTensors tensors;
  for (int64_t l = 0; l < kTinyLayers; ++l) {
    for (const Target& t : tiny_targets()) {
      if (std::find(modules.begin(), modules.end(), t.module) == modules.end()) continue;
      const int64_t rank = t.module == low_rank_module ? low_rank : r;
      const std::string key = "base_model.model.model.layers." + std::to_string(l) + "." + t.parent + "." + t.module;
      tensors.emplace_back(key + ".lora_A.weight", random_tensor(rng, {rank, t.in}, 0.3f));
      tensors.emplace_back(key + ".lora_B.weight", random_tensor(rng, {t.out, rank}, 0.3f));
    }
  }
  write_file(dir + "/adapter_model.safetensors", safetensors_bytes(tensors));
}

}  // namespace

TempDir::TempDir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/" + prefix + "XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("TempDir: mkdtemp failed for " + pattern);
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("read_file: cannot open " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("write_file: cannot write " + path);
}

void copy_tree(const std::string& from, const std::string& to) {
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
}

std::string safetensors_bytes(const NamedTensors& tensors) {
  ordered_json header = ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor t = tensor.contiguous();
    const size_t begin = data.size();
    data.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
    header[name] = {
        {"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // as safetensors pads: data 8-byte aligned
  const uint64_t n = text.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + text + data;
}

std::string tiny_config_json() {
  ordered_json c = {{"architectures", {"LlamaForCausalLM"}},
                    {"model_type", "llama"},
                    {"vocab_size", kTinyVocab},
                    {"hidden_size", kTinyHidden},
                    {"intermediate_size", kTinyInter},
                    {"num_hidden_layers", kTinyLayers},
                    {"num_attention_heads", 2},
                    {"num_key_value_heads", 1},
                    {"head_dim", 8},
                    {"hidden_act", "silu"},
                    {"rms_norm_eps", 1e-5},
                    {"rope_theta", 10000.0},
                    {"max_position_embeddings", 128},
                    {"tie_word_embeddings", false},
                    {"torch_dtype", "float32"},
                    {"bos_token_id", 1},
                    {"eos_token_id", 2}};
  return c.dump(2);
}

NamedTensors tiny_model_tensors(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t V = kTinyVocab, H = kTinyHidden;
  NamedTensors t;
  t.emplace_back("model.embed_tokens.weight", random_tensor(rng, {V, H}, 0.5f));
  for (int64_t l = 0; l < kTinyLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.emplace_back(p + "input_layernorm.weight", random_tensor(rng, {H}, 0.1f, 1.0f));
    for (const Target& tg : tiny_targets())
      t.emplace_back(p + tg.parent + "." + tg.module + ".weight", random_tensor(rng, {tg.out, tg.in}, 0.3f));
    t.emplace_back(p + "post_attention_layernorm.weight", random_tensor(rng, {H}, 0.1f, 1.0f));
  }
  t.emplace_back("model.norm.weight", random_tensor(rng, {H}, 0.1f, 1.0f));
  t.emplace_back("lm_head.weight", random_tensor(rng, {V, H}, 0.5f));
  return t;
}

void write_tiny_model(const std::string& dir, uint64_t seed) {
  write_file(dir + "/config.json", tiny_config_json());
  write_file(dir + "/model.safetensors", safetensors_bytes(tiny_model_tensors(seed)));
}

void write_tiny_moa_dir(const std::string& dir, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::vector<std::string> all = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  write_json(dir + "/moa_config.json", {{"format_version", 1},
                                        {"base_model", "tiny"},
                                        {"domains", {"a", "b"}},
                                        {"target_modules", all},
                                        {"router", {{"pooling", "mean"}, {"strategy", "last"}}},
                                        {"eta", 0.1}});
  ordered_json a = {{"peft_type", "LORA"},
                    {"task_type", "CAUSAL_LM"},
                    {"r", 2},
                    {"lora_alpha", 4},
                    {"target_modules", all},
                    {"bias", "none"},
                    {"use_dora", false},
                    {"fan_in_fan_out", false},
                    {"modules_to_save", nullptr},
                    {"rank_pattern", ordered_json::object()},
                    {"alpha_pattern", ordered_json::object()},
                    {"use_rslora", false},
                    {"layers_to_transform", nullptr}};
  write_expert(dir + "/experts/a", rng, a, all, 2, "", 0);
  ordered_json b = a;
  b["r"] = 3;
  b["lora_alpha"] = 6;
  b["target_modules"] = {"q_proj", "v_proj"};
  b["rank_pattern"] = {{"v_proj", 1}};
  b["use_rslora"] = true;
  write_expert(dir + "/experts/b", rng, b, {"q_proj", "v_proj"}, 3, "v_proj", 1);
  NamedTensors router;
  for (int64_t l = 0; l < kTinyLayers; ++l)
    router.emplace_back("layers." + std::to_string(l) + ".weight", random_tensor(rng, {2, kTinyHidden}, 2.0f));
  write_file(dir + "/router.safetensors", safetensors_bytes(router));
}

}  // namespace moa::test
