// The MoA-directory reader: the one reader of the format, used by the C++ engine
// (Engine::load_moa, load_expert) and, through moa_engine._C, by the Python package
// (moa_engine.moa_format, training, Engine). The format is specified in docs/moa-format.md.
//
// Three files implement it: moa_config.cpp (moa_config.json), peft_adapter.cpp (one PEFT
// LoRA folder: adapter_config.json + adapter_model.safetensors) and moa_dir.cpp
// (router.safetensors and the directory as a whole). rank_pattern / alpha_pattern keys are
// ECMAScript regexes (std::regex): Python-only syntax, such as (?P<name>...), is refused
// with a FormatError naming the pattern.
//
// Weights are memory-mapped: an expert's tensors view its file until the engine copies
// them into its stacks. Errors: FileNotFound for a missing folder or file, FormatError
// for anything else, each naming the file and the problem.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "moa/engine.h"

namespace moa::engine {

// The modules an expert may adapt, in the format's order.
const std::vector<std::string>& moa_target_modules();

// The contents of moa_config.json.
struct MoaConfig {
  int64_t format_version = 1;
  std::string base_model;
  std::vector<std::string> domains;         // router order
  std::vector<std::string> target_modules;  // a subset of moa_target_modules()
  std::string pooling = "mean";
  std::string strategy = "last";  // "last", "per_layer" or "vote"
  double eta = 0.1;
};

// Parses and checks moa_config.json's text; `source` names the file in messages.
MoaConfig parse_moa_config(const std::string& json_text, const std::string& source);
MoaConfig read_moa_config(const std::string& path);

// One PEFT LoRA adapter in engine terms.
struct PeftAdapter {
  std::string name;
  int64_t rank = 0;                        // the largest r over the targets
  std::vector<LoraWeights> targets;        // by layer, then module; tensors keep the file's dtype
  std::vector<double> scales;              // targets[i]'s scale before its rounding to float
  std::shared_ptr<const Checkpoint> file;  // the mapping the tensors view

  std::vector<std::string> modules() const;  // adapted modules, moa_target_modules() order
  int64_t hidden_size() const;               // read off the shapes
};

// Reads a PEFT LoRA folder; `name` "" takes the folder's name. With `base`, also checks
// every shape and layer against the base model, and that every module the config
// targets has weights.
PeftAdapter read_peft_adapter(const std::string& folder, const std::string& name, const ModelConfig* base);

// Reads router.safetensors: float32 [n_domains, hidden] per layer, layer order, owned
// (not views of the file). Each size given >= 0 is checked.
std::vector<at::Tensor> read_router(const std::string& path, int64_t n_domains, int64_t n_layers = -1,
                                    int64_t hidden = -1);

// A whole MoA directory: every part checked, the parts against each other, and with
// `base`, against the base model (layers, shapes, hidden size, router layers).
struct MoaDirectory {
  std::string path;
  MoaConfig config;
  std::vector<PeftAdapter> experts;  // config.domains order
  std::vector<at::Tensor> router;    // empty when the directory has no router.safetensors
};
MoaDirectory read_moa_dir(const std::string& path, const ModelConfig* base);

// "" when every value of t is finite, else what is not ("3 NaN, 1 inf"). The readers and
// Engine::add_expert / set_router refuse such weights: a NaN in an expert or a router would
// reach clients as tokens sampled from NaN logits.
std::string non_finite_summary(const at::Tensor& t);

}  // namespace moa::engine
