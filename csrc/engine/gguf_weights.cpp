// GGUF file -> ModelWeights, keeping each matrix in the file's GGML type (see weights.h).
//
// GGUF names (llama.cpp's): token_embd, output_norm, output, and per layer blk.N.attn_norm,
// attn_q / attn_k / attn_v (+ .bias), attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down.
// A matrix [rows, cols] is stored with ne = [cols, rows]. Quantized matrices are copied
// once into the engine's own memory (the mapped pages are released as each is copied);
// q/k rows that llama.cpp permuted for its RoPE layout are put back in HF's order; norms,
// biases and float (F32 / F16 / BF16) matrices become dense tensors in the engine's dtype.
#include <ATen/ATen.h>

#include <cctype>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/weights.h"
#include "kernels/cpu/quant.h"
#include "moa/errors.h"

namespace moa::engine {
namespace {

bool is_float_type(uint32_t id) {
  const auto t = static_cast<cpu::QType>(id);
  return t == cpu::QType::F32 || t == cpu::QType::F16 || t == cpu::QType::BF16;
}

std::string dims_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

// Row r of the file's q/k matrix holds HF's row perm[r] (per head: 2i + j <- i + j * hd / 2).
at::Tensor unpermute_index(int64_t heads, int64_t head_dim) {
  at::Tensor index = at::empty({heads * head_dim}, at::kLong);
  int64_t* p = index.data_ptr<int64_t>();
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < 2; ++j)
      for (int64_t i = 0; i < half; ++i) p[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
  return index;
}

class GgufLoader {
 public:
  GgufLoader(const GgufFile& file, const ModelConfig& c, at::ScalarType dtype, at::Device device)
      : file_(file), config_(c), options_(at::TensorOptions().dtype(dtype).device(device)) {}

  const GgufTensor& tensor(const std::string& name, std::vector<int64_t> ne) const {
    const GgufTensor* t = file_.find(name);
    if (t == nullptr)
      throw_error<FormatError>(file_.path(), ": missing tensor '", name, "' (needed by ", config_.model_type,
                               " with this file's metadata)");
    if (t->ne != ne)
      throw_error<FormatError>(file_.path(), ": tensor '", name, "' has shape (ne) ", dims_str(t->ne), ", expected ",
                               dims_str(ne), " from the file's metadata");
    return *t;
  }

  // A norm or bias: [n] in the engine's dtype.
  at::Tensor vector(const std::string& name, int64_t n) const {
    const GgufTensor& t = tensor(name, {n});
    at::Tensor out = dequantized(t, 1, n).reshape({n}).to(options_);
    file_.release(t);
    return out;
  }

  // Several [rows_i, cols] blocks fused by rows (q/k/v, gate/up) into one matrix.
  // heads[i] > 0: block i holds permuted q/k rows of that many heads.
  Matrix matrix(const std::vector<std::string>& names, const std::vector<int64_t>& rows, int64_t cols,
                const std::vector<int64_t>& heads = {}) const {
    std::vector<const GgufTensor*> parts;
    bool all_float = true;
    for (size_t i = 0; i < names.size(); ++i) {
      parts.push_back(&tensor(names[i], {cols, rows[i]}));
      all_float = all_float && is_float_type(parts.back()->type_id);
    }
    Matrix m;
    m.k = cols;
    for (int64_t r : rows) m.n += r;
    std::vector<at::Tensor> dense;
    for (size_t i = 0; i < parts.size(); ++i) {
      const GgufTensor& t = *parts[i];
      const bool permuted = i < heads.size() && heads[i] > 0;
      const at::Tensor index = permuted ? unpermute_index(heads[i], rows[i] / heads[i]) : at::Tensor();
      if (all_float) {
        at::Tensor w = dequantized(t, rows[i], cols);
        dense.push_back((permuted ? w.index_select(0, index) : w).to(options_));
      } else {
        at::Tensor raw = file_.view(t).reshape({rows[i], -1});
        raw = permuted ? raw.index_select(0, index) : raw.clone();
        const auto type = static_cast<cpu::QType>(t.type_id);
        if (!m.quant.empty() && m.quant.back().type == type) {
          QuantRows& last = m.quant.back();
          last.data = at::cat({last.data, raw}, 0);
          last.rows += rows[i];
        } else {
          m.quant.push_back({type, raw, rows[i]});
        }
      }
      file_.release(t);
    }
    if (all_float) m.dense = dense.size() == 1 ? dense[0] : at::cat(dense, 0);
    return m;
  }

 private:
  // Any served type as float32 [rows, cols].
  at::Tensor dequantized(const GgufTensor& t, int64_t rows, int64_t cols) const {
    at::Tensor out = at::empty({rows, cols}, at::kFloat);
    const int64_t row_bytes = static_cast<int64_t>(t.nbytes) / rows;
    cpu::dequantize_rows(static_cast<cpu::QType>(t.type_id), file_.data(t), row_bytes, cols, 0, rows,
                         out.data_ptr<float>());
    return out;
  }

  const GgufFile& file_;
  const ModelConfig& config_;
  at::TensorOptions options_;
};

}  // namespace

bool is_gguf_path(const std::string& path) {
  if (path.size() < 5) return false;
  std::string ext = path.substr(path.size() - 5);
  for (char& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return ext == ".gguf";
}

ModelWeights load_gguf_weights(const GgufFile& file, const ModelConfig& c, at::ScalarType dtype, at::Device device) {
  if (!device.is_cpu())
    throw_error<InvalidArgument>(file.path(), ": GGUF weights are served on the CPU only, not on ", device.str());
  const GgufLoader load(file, c, dtype, device);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Q = c.num_heads * c.head_dim, KV = c.num_kv_heads * c.head_dim;
  const bool permuted = gguf_permutes_qk(c.model_type);
  ModelWeights w;
  w.embed = load.matrix({"token_embd.weight"}, {V}, H);
  w.final_norm = load.vector("output_norm.weight", H);
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed, w.tied = true;
  } else {
    w.lm_head = load.matrix({"output.weight"}, {V}, H);
  }
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    L.attn_norm = load.vector(p + "attn_norm.weight", H);
    const std::vector<int64_t> heads =
        permuted ? std::vector<int64_t>{c.num_heads, c.num_kv_heads, 0} : std::vector<int64_t>{};
    L.wqkv = load.matrix({p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"}, {Q, KV, KV}, H, heads);
    if (c.attention_bias) {
      L.bqkv = at::cat(
          {load.vector(p + "attn_q.bias", Q), load.vector(p + "attn_k.bias", KV), load.vector(p + "attn_v.bias", KV)});
    }
    L.wo = load.matrix({p + "attn_output.weight"}, {H}, Q);
    L.mlp_norm = load.vector(p + "ffn_norm.weight", H);
    L.w_gate_up = load.matrix({p + "ffn_gate.weight", p + "ffn_up.weight"}, {I, I}, H);
    L.w_down = load.matrix({p + "ffn_down.weight"}, {H}, I);
  }
  return w;
}

}  // namespace moa::engine
