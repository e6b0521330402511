// The MoA directory read in C++: moa_config.json, one PEFT LoRA folder per domain and
// router.safetensors. The format is defined in moa_engine/moa_format.py (its module
// docstring); this reader follows it rule for rule, so that a C++ service loads a
// directory exactly as moa_engine.Engine(model, experts=moa_dir) does:
//
//   <moa_dir>/moa_config.json                 MoaConfig below; every key required, no other
//   <moa_dir>/experts/<domain>/adapter_config.json      PEFT's LoraConfig
//   <moa_dir>/experts/<domain>/adapter_model.safetensors
//       base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A,B}.weight
//       lora_A [r, in], lora_B [out, r]
//   <moa_dir>/router.safetensors (optional)   layers.{l}.weight [n_domains, hidden]
//
// An expert's scale per module is alpha / r (alpha / sqrt(r) with use_rslora), r and
// alpha the module's own: the first rank_pattern / alpha_pattern key k, in the file's
// order, with regex_match("(.*\.)?(k)", module name), else r / lora_alpha. Patterns are
// ECMAScript regexes (std::regex): PEFT's Python patterns that use Python-only syntax,
// such as (?P<name>...), are refused with a FormatError naming the pattern.
// Options that change the forward beyond a plain low-rank update (DoRA, biases,
// modules_to_save, fan_in_fan_out, ...) are refused by name.
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

// The target modules, in the order moa_format.TARGET_MODULES lists them.
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

// Validates as MoAConfig.from_dict does; `source` names the file in messages.
MoaConfig parse_moa_config(const std::string& json_text, const std::string& source);
MoaConfig read_moa_config(const std::string& path);

// One PEFT LoRA adapter in engine terms.
struct PeftAdapter {
  std::string name;
  int64_t rank = 0;                  // the largest r over the targets
  std::vector<LoraWeights> targets;  // by layer, then module; tensors keep the file's dtype
  std::shared_ptr<const Checkpoint> file;  // the mapping the tensors view

  std::vector<std::string> modules() const;  // adapted modules, moa_target_modules() order
  int64_t hidden_size() const;               // read off the shapes
};

// Reads a PEFT LoRA folder (load_peft_adapter in moa_format.py). With `base`, also
// checks every shape and layer against the base model, and that every module the
// config targets has weights.
PeftAdapter read_peft_adapter(const std::string& folder, const std::string& name, const ModelConfig* base);

// Reads router.safetensors: float32 [n_domains, hidden] per layer, layer order, owned
// (not views of the file). n_domains < 0 skips that check.
std::vector<at::Tensor> read_router(const std::string& path, int64_t n_domains);

// A whole MoA directory, checked as MoADir.load + load_experts do, and with `base`,
// against the base model (layers, shapes, hidden size, router layers).
struct MoaDirectory {
  std::string path;
  MoaConfig config;
  std::vector<PeftAdapter> experts;  // config.domains order
  std::vector<at::Tensor> router;    // empty when the directory has no router.safetensors
};
MoaDirectory read_moa_dir(const std::string& path, const ModelConfig* base);

}  // namespace moa::engine
