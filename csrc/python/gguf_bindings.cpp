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

py::dict model_config_dict(const moa::ModelConfig& c);  // engine_bindings.cpp

void bind_gguf(py::module_& m) {
  m.def(
      "_gguf_config",
      [](const std::string& path) {
        moa::ModelConfig c;
        {
          py::gil_scoped_release release;
          c = moa::engine::config_from_gguf(moa::engine::GgufFile::open(path));
        }
        return model_config_dict(c);
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
