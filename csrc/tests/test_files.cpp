// Test files (see test_files.h).
#include "test_files.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

// ---------------------------------------------------------------------------------------
// GGUF

namespace {

template <typename T>
std::string raw(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}
std::string gguf_str(const std::string& s) { return raw<uint64_t>(s.size()) + s; }

constexpr uint32_t kGgufU32 = 4, kGgufI32 = 5, kGgufF32 = 6, kGgufBool = 7, kGgufString = 8, kGgufArray = 9,
                   kGgufU64 = 10;

}  // namespace

void GgufWriter::add_raw(const std::string& key, uint32_t type, const std::string& value_bytes) {
  kvs_.push_back({key, type, value_bytes});
}
void GgufWriter::add_u32(const std::string& key, uint32_t v) { add_raw(key, kGgufU32, raw(v)); }
void GgufWriter::add_i32(const std::string& key, int32_t v) { add_raw(key, kGgufI32, raw(v)); }
void GgufWriter::add_u64(const std::string& key, uint64_t v) { add_raw(key, kGgufU64, raw(v)); }
void GgufWriter::add_f32(const std::string& key, float v) { add_raw(key, kGgufF32, raw(v)); }
void GgufWriter::add_bool(const std::string& key, bool v) { add_raw(key, kGgufBool, raw<uint8_t>(v ? 1 : 0)); }
void GgufWriter::add_string(const std::string& key, const std::string& v) { add_raw(key, kGgufString, gguf_str(v)); }
void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  std::string b = raw(kGgufString) + raw<uint64_t>(v.size());
  for (const auto& s : v) b += gguf_str(s);
  add_raw(key, kGgufArray, b);
}
void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  std::string b = raw(kGgufI32) + raw<uint64_t>(v.size());
  for (int32_t x : v) b += raw(x);
  add_raw(key, kGgufArray, b);
}
void GgufWriter::add_tensor(const std::string& name, uint32_t ggml_type, const std::vector<int64_t>& ne,
                            const std::string& data) {
  tensors_.push_back({name, ggml_type, ne, data});
}

void GgufWriter::remove_kv(const std::string& key) {
  std::erase_if(kvs_, [&](const Kv& kv) { return kv.key == key; });
}
void GgufWriter::remove_tensor(const std::string& name) {
  std::erase_if(tensors_, [&](const Tensor& t) { return t.name == name; });
}

std::string GgufWriter::bytes() {
  fields_.clear();
  std::string b;
  auto put = [&](const std::string& what, const std::string& v) {
    if (!what.empty()) fields_.push_back({what, b.size(), static_cast<int>(v.size())});
    b += v;
  };
  put("", "GGUF");
  put("version", raw(version_));
  put("tensor count", raw<uint64_t>(tensors_.size()));
  put("kv count", raw<uint64_t>(kvs_.size()));
  for (size_t i = 0; i < kvs_.size(); ++i) {
    const Kv& kv = kvs_[i];
    put("kv " + kv.key + " key length", raw<uint64_t>(kv.key.size()));
    put("", kv.key);
    put("kv " + kv.key + " type", raw(kv.type));
    const size_t at = b.size();
    if (kv.type == kGgufString) {
      fields_.push_back({"kv " + kv.key + " string length", at, 8});
    } else if (kv.type == kGgufArray) {
      fields_.push_back({"kv " + kv.key + " element type", at, 4});
      fields_.push_back({"kv " + kv.key + " array length", at + 4, 8});
    } else if (kv.value.size() == 4 || kv.value.size() == 8) {
      fields_.push_back({"kv " + kv.key + " value", at, static_cast<int>(kv.value.size())});
    }
    put("", kv.value);
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    put("tensor " + t.name + " name length", raw<uint64_t>(t.name.size()));
    put("", t.name);
    put("tensor " + t.name + " n_dims", raw<uint32_t>(t.ne.size()));
    for (size_t d = 0; d < t.ne.size(); ++d)
      put("tensor " + t.name + " ne" + std::to_string(d), raw<uint64_t>(t.ne[d]));
    put("tensor " + t.name + " type", raw(t.type));
    put("tensor " + t.name + " offset", raw(offset));
    offset += t.data.size();
    offset += (alignment_ - offset % alignment_) % alignment_;
  }
  b.append((alignment_ - b.size() % alignment_) % alignment_, '\0');
  for (const Tensor& t : tensors_) {
    b += t.data;
    b.append((alignment_ - b.size() % alignment_) % alignment_, '\0');
  }
  return b;
}

std::string gguf_f32_bytes(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * 4);
}

std::string gguf_f16_bytes(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kHalf).contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * 2);
}

std::string gguf_q8_0_bytes(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  const float* x = c.data_ptr<float>();
  if (c.numel() % 32 != 0) throw std::invalid_argument("gguf_q8_0_bytes: numel must be a multiple of 32");
  std::string out;
  for (int64_t b = 0; b < c.numel() / 32; ++b) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    const float d = amax / 127.0f;
    const at::Half dh(d);
    out += raw(dh.x);
    for (int i = 0; i < 32; ++i) {
      const float q = d == 0.0f ? 0.0f : std::nearbyint(x[32 * b + i] / d);
      out += static_cast<char>(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
    }
  }
  return out;
}

GgufWriter tiny_gguf(uint64_t seed, bool qwen2) {
  std::mt19937_64 rng(seed);
  const std::string arch = qwen2 ? "qwen2" : "llama";
  const int64_t V = kGgufVocab, H = kGgufHidden, I = kGgufInter, heads = 4, kv = 2, hd = 8;
  GgufWriter w;
  w.add_string("general.architecture", arch);
  w.add_string("general.name", "tiny");
  w.add_u32("general.alignment", 32);
  w.add_u32(arch + ".block_count", kGgufLayers);
  w.add_u32(arch + ".context_length", 128);
  w.add_u32(arch + ".embedding_length", H);
  w.add_u32(arch + ".feed_forward_length", I);
  w.add_u32(arch + ".attention.head_count", heads);
  w.add_u32(arch + ".attention.head_count_kv", kv);
  w.add_f32(arch + ".rope.freq_base", 10000.0f);
  w.add_f32(arch + ".attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_u32(arch + ".rope.dimension_count", hd);
  w.add_string("tokenizer.ggml.model", "gpt2");
  std::vector<std::string> tokens;
  for (int64_t i = 0; i < V; ++i) tokens.push_back("t" + std::to_string(i));
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_i32_array("tokenizer.ggml.token_type", std::vector<int32_t>(V, 1));
  w.add_u32("tokenizer.ggml.bos_token_id", 1);
  w.add_u32("tokenizer.ggml.eos_token_id", 2);
  w.add_u32("tokenizer.ggml.eot_token_id", 3);
  auto f32 = [&](const std::string& name, std::vector<int64_t> ne, float std, float mean) {
    at::Tensor t = random_tensor(rng, std::vector<int64_t>(ne.rbegin(), ne.rend()), std, mean);
    w.add_tensor(name, 0, ne, gguf_f32_bytes(t));
  };
  auto f16 = [&](const std::string& name, std::vector<int64_t> ne) {
    w.add_tensor(name, 1, ne, gguf_f16_bytes(random_tensor(rng, std::vector<int64_t>(ne.rbegin(), ne.rend()), 0.3f)));
  };
  auto q8 = [&](const std::string& name, std::vector<int64_t> ne) {
    w.add_tensor(name, 8, ne, gguf_q8_0_bytes(random_tensor(rng, std::vector<int64_t>(ne.rbegin(), ne.rend()), 0.3f)));
  };
  f16("token_embd.weight", {H, V});
  for (int64_t l = 0; l < kGgufLayers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    f32(p + "attn_norm.weight", {H}, 0.1f, 1.0f);
    q8(p + "attn_q.weight", {H, heads * hd});
    q8(p + "attn_k.weight", {H, kv * hd});
    f16(p + "attn_v.weight", {H, kv * hd});
    if (qwen2) {
      f32(p + "attn_q.bias", {heads * hd}, 0.1f, 0.0f);
      f32(p + "attn_k.bias", {kv * hd}, 0.1f, 0.0f);
      f32(p + "attn_v.bias", {kv * hd}, 0.1f, 0.0f);
    }
    q8(p + "attn_output.weight", {heads * hd, H});
    f32(p + "ffn_norm.weight", {H}, 0.1f, 1.0f);
    q8(p + "ffn_gate.weight", {H, I});
    q8(p + "ffn_up.weight", {H, I});
    q8(p + "ffn_down.weight", {I, H});
  }
  f32("output_norm.weight", {H}, 0.1f, 1.0f);
  q8("output.weight", {H, V});
  return w;
}

}  // namespace moa::test
