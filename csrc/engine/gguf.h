// A reader for GGUF model files (llama.cpp's format), and their metadata -> ModelConfig.
// The file is memory-mapped; tensors are read in place, in their GGML type (no float
// conversion): data() and view() give the raw bytes of a tensor, which the quantized
// kernels read as they are (kernels/cpu/quant_types.h gives the block layouts).
//
// Format (little-endian; spec: ggml's docs/gguf.md):
//   magic "GGUF" (u32 0x46554747), version u32 (2 or 3), tensor_count u64, kv_count u64,
//   kv_count metadata pairs: key (string), value type (u32), value;
//   tensor_count tensor infos: name (string), n_dims (u32, 1..4), ne[n_dims] (u64, ne[0]
//   the innermost: a row's length), type (u32, a ggml type id), offset (u64, relative to
//   the data section, a multiple of the alignment);
//   padding to the next multiple of general.alignment (u32 metadata, default 32), then the
//   data section.
//   A string is a u64 length and its bytes; an array is an element type (u32), a length
//   (u64) and the elements.
// Every count, length and offset is checked against the file before it is used: a
// truncated or garbled file gives a moa::FormatError whose message starts with the file's
// path, never a crash or a huge allocation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "moa/engine.h"

namespace moa::engine {

// GGUF metadata value types, as the file numbers them.
enum class GgufType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

// "u32", "string", "array", ...; "type <n>" for an unknown number.
std::string gguf_type_name(uint32_t type);

// An array value, kept lazily: its elements stay in the file's mapping (already checked to
// lie within it) and are decoded by GgufFile's get_*_array. Arrays of arrays are checked
// but can only be measured (length, elem_type), not read.
struct GgufArray {
  GgufType elem_type = GgufType::U8;
  uint64_t length = 0;
  const uint8_t* data = nullptr;  // the first element, in the mapping
  uint64_t nbytes = 0;            // of all the elements
};

// One metadata value of any GGUF kind. The variant's alternative is the file's type
// (type() gives it as a GgufType).
struct GgufValue {
  std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool, std::string, GgufArray, uint64_t,
               int64_t, double>
      value;
  // The variant's alternatives are in GgufType's order, so the index is the type number.
  GgufType type() const { return static_cast<GgufType>(value.index()); }
};

struct GgufTensor {
  std::string name;
  uint32_t type_id = 0;     // ggml type (moa::cpu::QType for those served)
  std::vector<int64_t> ne;  // GGUF order: ne[0] is the innermost (row length); 1 to 4 dims
  uint64_t offset = 0;      // absolute file offset of the first byte
  uint64_t nbytes = 0;      // ne[0] / block_elems * block_bytes * ne[1] * ...
};

class GgufFile {
 public:
  // Maps and checks the whole header and every tensor info (type served, sizes, bytes
  // within the file). Throws FileNotFound (no such file) or FormatError.
  static GgufFile open(const std::string& path);

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  const std::string& path() const;
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // where the data section starts
  uint64_t file_size() const;

  // Metadata. The getters throw FormatError naming the file and the key when the key is
  // absent or holds another kind of value.
  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  const GgufValue* find_value(const std::string& key) const;      // nullptr when absent
  const std::vector<std::string>& keys() const { return keys_; }  // in file order
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;   // any integer kind that fits int64
  double get_float(const std::string& key) const;  // f32, f64 or an integer
  bool get_bool(const std::string& key) const;
  uint64_t array_length(const std::string& key) const;
  GgufType array_type(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;  // integer (or bool) elements
  std::vector<double> get_float_array(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;

  // Tensors in file order.
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find(const std::string& name) const;  // nullptr when absent
  // The tensor's bytes in the mapping; valid while this GgufFile lives.
  const uint8_t* data(const GgufTensor& t) const;
  // A uint8 1-D CPU tensor of nbytes over the mapping: read only (never write to it),
  // valid while this GgufFile lives.
  at::Tensor view(const GgufTensor& t) const;
  // Drops the mapped pages of a tensor already copied (madvise DONTNEED; they are read
  // back from the file if touched again).
  void release(const GgufTensor& t) const;

  struct Mapping;  // the mmap (gguf.cpp)

 private:
  GgufFile();
  void parse();

  std::unique_ptr<Mapping> map_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::unordered_map<std::string, GgufValue> metadata_;
  std::vector<std::string> keys_;
  std::vector<GgufTensor> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// The model's configuration from the GGUF metadata: general.architecture (llama, mistral
// or qwen2) and the {arch}.* keys, checked as parse_model_config checks config.json.
// Throws FormatError naming the file and the key. Unsupported features (rope scaling,
// llama3 rope_freqs, mixture of experts, MLP biases) are refused by name.
//   vocab_size: {arch}.vocab_size, else len(tokenizer.ggml.tokens), else token_embd.weight ne[1]
//   head_dim: {arch}.attention.key_length, else {arch}.rope.dimension_count, else hidden / heads
//   attention_bias: blk.0.attn_q.bias exists; tie_word_embeddings: no output.weight
//   sliding_window: {arch}.attention.sliding_window for llama / mistral (qwen2: ignored, as
//     config.json's sliding_window without use_sliding_window is)
//   eos_token_ids: tokenizer.ggml.eos_token_id, then tokenizer.ggml.eot_token_id if different
//   torch_dtype: "" (the weights keep their GGML types)
ModelConfig config_from_gguf(const GgufFile& file);

// Whether the files of an architecture store the rows of attn_q / attn_k permuted for
// llama.cpp's RoPE layout: llama.cpp's convert_hf_to_gguf.py permutes them for LlamaModel
// (which writes Llama and also Mistral checkpoints, as "llama"), not for Qwen2. True for
// "llama" only, as transformers' GGUF loader (LlamaTensorProcessor, keyed by the file's
// architecture) and moa_engine.models._GGUF_PERMUTES_QK undo it. A file that names its
// architecture "mistral" is not one llama.cpp writes; it is taken as unpermuted, as
// transformers takes it. Per head of head_dim rows, the file holds HF's rows
// [0, hd/2, 1, hd/2 + 1, ...]: row 2i + j of a head is HF's row i + j * hd / 2.
bool gguf_permutes_qk(const std::string& arch);

}  // namespace moa::engine
