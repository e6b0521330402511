// Files for the C++ tests: a tiny random Llama model folder and a MoA directory for it,
// written the way HF transformers and PEFT write them, plus small file helpers.
//
// Tiny model (kTiny*): llama, vocab 64, hidden 16, intermediate 24, 2 layers, 2 heads of
// dim 8, 1 KV head, untied lm_head. MoA directory: domains "a" (r 2, every module) and
// "b" (r 3, q_proj and v_proj, rank_pattern {"v_proj": 1}, rslora), router.safetensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace moa::test {

// Checks for the test binaries: expect() prints "ok" or "FAIL" and counts; main returns
// summary(), which prints the counts and is 0 when nothing failed.
inline int failures = 0;
inline int checks = 0;

inline void expect(bool ok, const std::string& what) {
  ++checks;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// fn() must throw E whose message holds every needle.
template <typename E>
void expect_error(const std::string& what, const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const E& e) {
    const std::string msg = e.what();
    std::string missing;
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos) missing += " '" + n + "'";
    expect(missing.empty(), what + (missing.empty() ? "" : " (message lacks" + missing + ")") + "\n       " + msg);
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": threw the wrong type: " + e.what());
    return;
  }
  expect(false, what + ": did not throw");
}

inline int summary() {
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}

constexpr int64_t kTinyVocab = 64, kTinyHidden = 16, kTinyInter = 24, kTinyLayers = 2;

// A fresh folder under $TMPDIR, removed with everything in it on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "moa-test-");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);  // creates parent folders
void copy_tree(const std::string& from, const std::string& to);

// safetensors bytes: 8-byte header length, JSON header, then the tensors' bytes in order.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
std::string safetensors_bytes(const NamedTensors& tensors);

// The tiny model's config.json text and tensors (float32, from `seed`).
std::string tiny_config_json();
NamedTensors tiny_model_tensors(uint64_t seed);
void write_tiny_model(const std::string& dir, uint64_t seed);

// A MoA directory of two experts and a router for the tiny model.
void write_tiny_moa_dir(const std::string& dir, uint64_t seed);

// A GGUF file writer (version 3 unless set), for the GGUF reader's tests: metadata and
// tensors in the order added, tensor data at multiples of the alignment. fields() lists
// where bytes() put each header field (for targeted corruptions).
class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}
  void set_version(uint32_t v) { version_ = v; }
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_u64(const std::string& key, uint64_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // A metadata pair of any type from its raw value bytes (after the type).
  void add_raw(const std::string& key, uint32_t type, const std::string& value_bytes);
  // ne in GGUF order (ne[0] the row length); data must be the tensor's bytes.
  void add_tensor(const std::string& name, uint32_t ggml_type, const std::vector<int64_t>& ne, const std::string& data);
  void remove_kv(const std::string& key);
  void remove_tensor(const std::string& name);

  struct Field {
    std::string what;  // "version", "kv 3 key length", "tensor blk.0.attn_q.weight type", ...
    size_t offset;
    int width;  // 4 or 8
  };
  std::string bytes();
  const std::vector<Field>& fields() const { return fields_; }

 private:
  struct Kv {
    std::string key;
    uint32_t type;
    std::string value;
  };
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<int64_t> ne;
    std::string data;
  };
  uint32_t version_ = 3;
  uint32_t alignment_;
  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
  std::vector<Field> fields_;
};

// Tensor bytes in GGML types, from float32 values (row after row, rows of ne[0]).
std::string gguf_f32_bytes(const at::Tensor& t);
std::string gguf_f16_bytes(const at::Tensor& t);
std::string gguf_q8_0_bytes(const at::Tensor& t);  // numel % 32 == 0

// A tiny llama GGUF model (the shape of llama.cpp's files): vocab 64, hidden 32,
// intermediate 64, 2 layers, 4 heads of dim 8, 2 KV heads, context 128, an untied output;
// F32 norms, F16 token_embd / attn_v, Q8_0 for the other matrices; tokenizer.ggml.tokens
// and bos 1 / eos 2 / eot 3. qwen2 = true: architecture qwen2 with q/k/v biases.
constexpr int64_t kGgufVocab = 64, kGgufHidden = 32, kGgufInter = 64, kGgufLayers = 2;
GgufWriter tiny_gguf(uint64_t seed, bool qwen2 = false);

}  // namespace moa::test
