// Files for the C++ tests: a tiny random Llama model folder and a MoA directory for it,
// written the way HF transformers and PEFT write them, plus small file helpers.
//
// Tiny model (kTiny*): llama, vocab 64, hidden 16, intermediate 24, 2 layers, 2 heads of
// dim 8, 1 KV head, untied lm_head. MoA directory: domains "a" (r 2, every module) and
// "b" (r 3, q_proj and v_proj, rank_pattern {"v_proj": 1}, rslora), router.safetensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moa::test {

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

}  // namespace moa::test
