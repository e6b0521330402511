// The GGUF reader (engine/gguf.h) for Python: moa_engine._C._gguf_config(path) and
// _gguf_tensors(path), internal (tests, tools). Errors map as for the engine (the
// translator that bind_engine registers): FormatError -> ValueError, FileNotFound ->
// FileNotFoundError.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>

#include "engine/gguf.h"
#include "kernels/cpu/quant_types.h"

namespace py = pybind11;

namespace {

// Every ModelConfig field, named as ModelConfig names it.
py::dict gguf_config_dict(const moa::ModelConfig& c) {
  py::dict d;
  d["model_type"] = c.model_type;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_layers"] = c.num_layers;
  d["num_heads"] = c.num_heads;
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["rope_theta"] = c.rope_theta;
  d["rope_llama3_factor"] = c.rope_llama3_factor;
  d["rope_llama3_low_freq_factor"] = c.rope_llama3_low_freq_factor;
  d["rope_llama3_high_freq_factor"] = c.rope_llama3_high_freq_factor;
  d["rope_llama3_original_max_position"] = c.rope_llama3_original_max_position;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["sliding_window"] = c.sliding_window;
  d["attention_bias"] = c.attention_bias;
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  d["torch_dtype"] = c.torch_dtype;
  d["eos_token_ids"] = c.eos_token_ids;
  d["bos_token_id"] = c.bos_token_id;
  return d;
}

}  // namespace

void bind_gguf(py::module_& m) {
  m.def(
      "_gguf_config",
      [](const std::string& path) {
        moa::ModelConfig c;
        {
          py::gil_scoped_release release;
          c = moa::engine::config_from_gguf(moa::engine::GgufFile::open(path));
        }
        return gguf_config_dict(c);
      },
      py::arg("path"), "Internal (tests, tools): a GGUF file's metadata as the engine's ModelConfig fields.");
  m.def(
      "_gguf_tensors",
      [](const std::string& path) {
        std::vector<moa::engine::GgufTensor> tensors;
        {
          py::gil_scoped_release release;
          tensors = moa::engine::GgufFile::open(path).tensors();
        }
        py::list out;
        for (const auto& t : tensors) {
          py::dict d;
          d["name"] = t.name;
          d["type"] = moa::cpu::ggml_type_name(t.type_id);
          d["type_id"] = t.type_id;
          d["shape"] = t.ne;  // GGUF order: ne[0] (the row length) first
          d["offset"] = t.offset;
          d["nbytes"] = t.nbytes;
          out.append(d);
        }
        return out;
      },
      py::arg("path"),
      "Internal (tests, tools): a GGUF file's tensors as dicts of name, type (ggml's name), type_id, "
      "shape (GGUF order, ne[0] first), offset (absolute) and nbytes.");
}
