// The MoA directory as a whole: router.safetensors, and the directory's parts checked
// against each other and the base model (docs/moa-format.md). moa_config.cpp reads
// moa_config.json, peft_adapter.cpp each expert.
#include "engine/moa_dir.h"

#include <ATen/ATen.h>

#include <map>
#include <regex>

#include "engine/moa_format_util.h"

namespace moa::engine {
namespace {

using namespace moa_format;

// The experts adapt only the config's target modules, and they and the routers agree on
// the hidden size.
void check_experts(const MoaDirectory& dir) {
  const auto& allowed = dir.config.target_modules;
  for (const PeftAdapter& e : dir.experts) {
    std::vector<std::string> outside;
    for (const auto& m : e.modules())
      if (std::find(allowed.begin(), allowed.end(), m) == allowed.end()) outside.push_back(m);
    if (!outside.empty())
      throw_error<FormatError>(dir.path, ": expert '", e.name, "' adapts ", join(outside),
                               ", not in the MoA config's target_modules ", join(allowed));
  }
  std::map<int64_t, std::vector<std::string>> sizes;
  for (const PeftAdapter& e : dir.experts) sizes[e.hidden_size()].push_back("'" + e.name + "'");
  if (!dir.router.empty()) sizes[dir.router[0].size(1)].push_back("'router'");
  if (sizes.size() > 1) {
    std::string listing;
    for (const auto& [h, names] : sizes)
      for (const auto& n : names) listing += (listing.empty() ? "" : ", ") + n + ": " + std::to_string(h);
    throw_error<FormatError>(dir.path, ": experts and router disagree on the hidden size: {", listing, "}");
  }
}

// Every domain's expert folder has both files.
void check_expert_files(const fs::path& dir, const MoaConfig& config, const std::string& config_path) {
  for (const auto& domain : config.domains) {
    const fs::path folder = dir / kExpertsDir / domain;
    for (const char* file : {kAdapterConfig, kAdapterWeights})
      if (!is_file(folder / file))
        throw_error<FileNotFound>((folder / file).string(), ": missing (domain '", domain, "' of ", config_path, ")");
  }
}

// One router per layer of the model, each taking its hidden size (a size < 0 is not checked).
void check_router_dims(const std::string& path, const std::vector<at::Tensor>& weights, int64_t n_layers,
                       int64_t hidden) {
  if (n_layers >= 0 && static_cast<int64_t>(weights.size()) != n_layers)
    throw_error<FormatError>(path, ": router has ", weights.size(), " layers but the model has ", n_layers);
  if (hidden >= 0 && weights[0].size(1) != hidden)
    throw_error<FormatError>(path, ": router input size is ", weights[0].size(1), " but the model's hidden size is ",
                             hidden);
}

}  // namespace

std::vector<at::Tensor> read_router(const std::string& path, int64_t n_domains, int64_t n_layers, int64_t hidden) {
  if (!is_file(path)) throw_error<FileNotFound>(path, ": no such router file");
  const Checkpoint file = Checkpoint::open_file(path);
  static const std::regex key_re(R"(layers\.(\d+)\.weight)");
  std::map<int64_t, std::string> layers;
  for (const std::string& key : file.names()) {
    std::smatch m;
    std::optional<int64_t> layer;
    if (key.size() <= kMaxRegexInput && std::regex_match(key, m, key_re)) layer = parse_index(m[1].str());
    if (!layer) {
      const std::string shown = key.size() > 120 ? key.substr(0, 117) + "..." : key;
      throw_error<FormatError>(path, ": unexpected tensor '", shown, "'; expected only layers.{l}.weight");
    }
    layers[*layer] = key;
  }
  if (layers.empty()) throw_error<FormatError>(path, ": holds no router weights");
  std::vector<at::Tensor> weights;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    if (!layers.count(l)) {
      std::string have;
      for (const auto& [i, key] : layers) have += (have.empty() ? "" : ", ") + std::to_string(i);
      throw_error<FormatError>(path, ": lacks layers.", l, ".weight (has layers [", have, "])");
    }
    const TensorRecord& rec = file.record(layers[l]);
    const TensorRecord& first = file.record(layers[0]);
    if (rec.shape.size() != 2 || !at::isFloatingType(rec.dtype))
      throw_error<FormatError>(path, ": layer ", l, ": expected a floating [n_domains, hidden] tensor, got ", rec.dtype,
                               " ", shape_str(rec.shape));
    if (rec.shape != first.shape)
      throw_error<FormatError>(path, ": layer ", l, " is ", shape_str(rec.shape), " but layer 0 is ",
                               shape_str(first.shape));
    // Owned float32 copies: the engine keeps the routers after the file is closed.
    weights.push_back(file.view(layers[l]).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true));
    const std::string bad = non_finite_summary(weights.back());
    if (!bad.empty()) throw_error<FormatError>(path, ": tensor '", layers[l], "' has non-finite values (", bad, ")");
  }
  if (n_domains >= 0 && weights[0].size(0) != n_domains)
    throw_error<FormatError>(path, ": router has ", weights[0].size(0), " outputs but the MoA dir has ", n_domains,
                             " domains");
  check_router_dims(path, weights, n_layers, hidden);
  return weights;
}

MoaDirectory read_moa_dir(const std::string& path, const ModelConfig* base) {
  const fs::path dir(path);
  if (!is_dir(dir)) throw_error<FileNotFound>(path, ": no such MoA directory");
  MoaDirectory out;
  out.path = path;
  const std::string config_path = (dir / kConfigFile).string();
  out.config = read_moa_config(config_path);
  check_expert_files(dir, out.config, config_path);
  const fs::path router_path = dir / kRouterFile;
  if (path_exists(router_path))
    out.router = read_router(router_path.string(), static_cast<int64_t>(out.config.domains.size()));
  for (const auto& domain : out.config.domains)
    out.experts.push_back(read_peft_adapter((dir / kExpertsDir / domain).string(), domain, base));
  check_experts(out);
  if (base != nullptr && !out.router.empty())
    check_router_dims(router_path.string(), out.router, base->num_layers, base->hidden_size);
  return out;
}

}  // namespace moa::engine
