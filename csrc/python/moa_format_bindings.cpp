// The MoA-directory reader (engine/moa_dir.h) for Python: moa_engine.moa_format reads every
// MoA directory, PEFT adapter and router file through these functions, so that Python and
// C++ services read the format one way (docs/moa-format.md). Errors map as for the
// engine: FormatError -> ValueError, FileNotFound -> FileNotFoundError.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <optional>

#include "engine/config.h"
#include "engine/moa_dir.h"

namespace py = pybind11;

namespace {

py::dict config_dict(const moa::engine::MoaConfig& c) {
  py::dict router;
  router["pooling"] = c.pooling;
  router["strategy"] = c.strategy;
  py::dict d;
  d["format_version"] = c.format_version;
  d["base_model"] = c.base_model;
  d["domains"] = c.domains;
  d["target_modules"] = c.target_modules;
  d["router"] = router;
  d["eta"] = c.eta;
  return d;
}

// name, rank, modules, hidden_size and, with tensors, targets: [(layer, module, A, B, scale)]
// with A and B copied out of the file's mapping (so they outlive it), in the file's dtype.
py::dict adapter_dict(const moa::engine::PeftAdapter& a, bool tensors) {
  py::dict d;
  d["name"] = a.name;
  d["rank"] = a.rank;
  d["modules"] = a.modules();
  d["hidden_size"] = a.hidden_size();
  if (tensors) {
    py::list targets;
    for (size_t i = 0; i < a.targets.size(); ++i) {
      const moa::LoraWeights& w = a.targets[i];
      targets.append(py::make_tuple(w.layer, w.module, w.lora_a.clone(), w.lora_b.clone(), a.scales[i]));
    }
    d["targets"] = targets;
  }
  return d;
}

std::optional<moa::ModelConfig> base_config(const std::optional<std::string>& config_json) {
  if (!config_json) return std::nullopt;
  return moa::engine::parse_model_config(*config_json, "base_config");
}

}  // namespace

void bind_moa_format(py::module_& m) {
  m.def(
      "moa_parse_config",
      [](const std::string& text, const std::string& source) {
        return config_dict(moa::engine::parse_moa_config(text, source));
      },
      py::arg("text"), py::arg("source"),
      "moa_config.json's text -> its fields as a dict, checked; errors name `source`.");
  m.def(
      "moa_read_config", [](const std::string& path) { return config_dict(moa::engine::read_moa_config(path)); },
      py::arg("path"), "Reads and checks a moa_config.json file -> its fields as a dict.");
  m.def(
      "moa_read_adapter",
      [](const std::string& folder, const std::string& name, const std::optional<std::string>& base_config_json) {
        const auto base = base_config(base_config_json);
        py::gil_scoped_release release;
        auto adapter = moa::engine::read_peft_adapter(folder, name, base ? &*base : nullptr);
        py::gil_scoped_acquire gil;
        return adapter_dict(adapter, true);
      },
      py::arg("folder"), py::arg("name") = "", py::arg("base_config_json") = py::none(),
      "Reads a PEFT LoRA folder -> {name, rank, modules, hidden_size, targets: [(layer, module, "
      "lora_a [r, in], lora_b [out, r], scale)]}. base_config_json (a config.json's text) adds "
      "the checks against the base model.");
  m.def(
      "moa_read_router",
      [](const std::string& path, int64_t n_domains, int64_t n_layers, int64_t hidden) {
        py::gil_scoped_release release;
        return moa::engine::read_router(path, n_domains, n_layers, hidden);
      },
      py::arg("path"), py::arg("n_domains") = -1, py::arg("n_layers") = -1, py::arg("hidden") = -1,
      "Reads router.safetensors -> [float32 [n_domains, hidden]] in layer order; each size "
      "given (>= 0) is checked.");
  m.def(
      "moa_read_dir",
      [](const std::string& path, const std::optional<std::string>& base_config_json, bool tensors) {
        const auto base = base_config(base_config_json);
        py::gil_scoped_release release;
        auto dir = moa::engine::read_moa_dir(path, base ? &*base : nullptr);
        py::gil_scoped_acquire gil;
        py::list experts;
        for (const auto& e : dir.experts) experts.append(adapter_dict(e, tensors));
        py::dict d;
        d["config"] = config_dict(dir.config);
        d["experts"] = experts;
        d["router"] = dir.router.empty() ? py::object(py::none()) : py::cast(dir.router);
        return d;
      },
      py::arg("path"), py::arg("base_config_json") = py::none(), py::arg("tensors") = false,
      "Reads and checks a whole MoA directory -> {config, experts (router order), router (or "
      "None)}; with tensors, each expert's targets too. base_config_json adds the checks "
      "against the base model.");
}
