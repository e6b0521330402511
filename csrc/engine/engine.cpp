// moa::Engine (include/moa/engine.h): construction and the experts and routers it serves.
// The other parts of the class are in scheduler.cpp (submit / step / generate),
// routing.cpp (which experts serve a sequence) and scoring.cpp (forward / route);
// engine_impl.h holds the state they share.
#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <optional>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/engine_impl.h"
#include "engine/gguf.h"
#include "engine/linear.h"
#include "engine/moa_dir.h"
#include "engine/weights.h"

namespace moa {

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

namespace {

// options.device as a device this build can serve on: "cpu", or "cuda" / "cuda:N" where
// moa_engine was built with CUDA and the device is there.
at::Device engine_device(const std::string& name) {
  std::optional<at::Device> device;
  try {
    device = at::Device(name);
  } catch (const c10::Error&) {
    throw_error<InvalidArgument>("device '", name, "' is not a device (expected 'cpu', 'cuda' or 'cuda:N')");
  }
  if (device->is_cpu()) return *device;
#ifdef MOA_WITH_CUDA
  if (device->is_cuda()) {
    if (!at::globalContext().hasCUDA())
      throw_error<InvalidArgument>("device '", name, "': no CUDA device is visible to this process");
    return *device;
  }
  throw_error<InvalidArgument>("device '", name, "' is not supported (supported: cpu, cuda)");
#else
  throw_error<InvalidArgument>("device '", name,
                               "' is not supported by this build (supported: cpu; CUDA needs a build with "
                               "MOA_ENGINE_CUDA=1)");
#endif
}

void check_options(const EngineOptions& options) {
  const at::Device device = engine_device(options.device);
  if (!device.is_cpu() && !options.quantization.empty())
    throw_error<InvalidArgument>("quantization '", options.quantization, "' runs on the CPU only, not on device '",
                                 options.device, "'");
  if (options.max_batch <= 0) throw_error<InvalidArgument>("max_batch must be > 0, got ", options.max_batch);
  if (options.max_seq_len <= 1) throw_error<InvalidArgument>("max_seq_len must be > 1, got ", options.max_seq_len);
  if (options.max_prefill_tokens <= 0)
    throw_error<InvalidArgument>("max_prefill_tokens must be > 0, got ", options.max_prefill_tokens);
  engine::parse_quantization(options.quantization);  // a bad name fails before the weights load
}

at::ScalarType resolve_dtype(const std::string& name, const ModelConfig& c, const std::string& device) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") {
    if (device == "cpu")
      throw_error<InvalidArgument>("dtype 'float16' is supported on CUDA only; on CPU use 'float32' or 'bfloat16'");
    return at::kHalf;
  }
  if (name == "auto") {
    // The checkpoint's dtype; float16 checkpoints run in float32 on CPU.
    if (c.torch_dtype == "bfloat16") return at::kBFloat16;
    if (c.torch_dtype == "float16" && device != "cpu") return at::kHalf;
    return at::kFloat;
  }
  throw_error<InvalidArgument>("dtype '", name, "' is not supported (expected auto, float32, bfloat16 or float16)");
}

// One LoraWeights::module name -> its target linear.
engine::Target target_of(const std::string& expert, const std::string& module) {
  static const std::map<std::string, engine::Target> modules = {
      {"q_proj", engine::Target::q},      {"k_proj", engine::Target::k},       {"v_proj", engine::Target::v},
      {"o_proj", engine::Target::o},      {"gate_proj", engine::Target::gate}, {"up_proj", engine::Target::up},
      {"down_proj", engine::Target::down}};
  auto it = modules.find(module);
  if (it == modules.end())
    throw_error<InvalidArgument>(
        "expert '", expert, "': module '", module,
        "' is not a target linear (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
  return it->second;
}

}  // namespace

// -----------------------------------------------------------------------------------------
// Construction
// -----------------------------------------------------------------------------------------

Engine::Engine(const std::string& model_dir, const EngineOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.model_dir = model_dir;
  m.options = options;
  check_options(options);
  engine::small_m_limit();  // a bad MOA_ENGINE_SMALL_M or MOA_ENGINE_INT8_M fails here, not in the first forward
  engine::int8_m_limit();
  const at::Device device = engine_device(options.device);
  std::shared_ptr<const engine::Backend> backend = engine::make_backend(options.backend, device);
  engine::ModelWeights weights;
  if (engine::is_gguf_path(model_dir)) {
    const engine::GgufFile file = engine::GgufFile::open(model_dir);
    m.config = engine::config_from_gguf(file);
    m.dtype = resolve_dtype(options.dtype, m.config, options.device);
    weights = engine::load_gguf_weights(file, m.config, m.dtype, device);
  } else {
    m.config = engine::read_model_config(model_dir);
    m.dtype = resolve_dtype(options.dtype, m.config, options.device);
    weights = engine::load_weights(model_dir, m.config, m.dtype, device);
  }
  if (const auto type = engine::parse_quantization(options.quantization)) engine::quantize_weights(weights, *type);
  m.model =
      std::make_unique<engine::Model>(m.config, std::move(weights), m.dtype, options.max_seq_len, std::move(backend));
  m.cache = m.model->make_cache(options.max_batch, options.max_seq_len);
  m.adapters = std::make_shared<engine::AdapterTable>(m.config, m.dtype, device);
  m.model->set_adapters(m.adapters);
  m.slots.resize(options.max_batch);
}

Engine::~Engine() = default;

const ModelConfig& Engine::config() const { return impl_->config; }
const EngineOptions& Engine::options() const { return impl_->options; }
at::ScalarType Engine::dtype() const { return impl_->dtype; }
int64_t Engine::weight_bytes() const { return impl_->model->weights().bytes(); }
std::string Engine::backend_name() const { return impl_->model->backend().name(); }

// -----------------------------------------------------------------------------------------
// Experts
// -----------------------------------------------------------------------------------------

void Engine::add_expert(const std::string& name, const std::vector<LoraWeights>& weights) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  engine::LoraPieces pieces;
  for (const LoraWeights& w : weights) {
    const engine::Target target = target_of(name, w.module);
    if (!w.lora_a.defined() || !w.lora_b.defined())
      throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " has no lora_A or lora_B");
    engine::LoraPiece p{w.lora_a.to(at::kCPU, impl_->dtype).contiguous(),
                        w.lora_b.to(at::kCPU, impl_->dtype).contiguous(), w.scale};
    // Checked in the engine's dtype: a float32 value past float16's range becomes inf here.
    for (const auto& [what, t] : {std::pair{"lora_A", p.a}, std::pair{"lora_B", p.b}}) {
      const std::string bad = engine::non_finite_summary(t);
      if (!bad.empty())
        throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " ", what,
                                     " has non-finite values (", bad, ")");
    }
    if (!std::isfinite(w.scale))
      throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " has scale ", w.scale);
    if (!pieces.emplace(std::make_pair(w.layer, target), p).second)
      throw_error<InvalidArgument>("expert '", name, "': layer ", w.layer, " ", w.module, " is given twice");
  }
  if (impl_->adapters->slot_of(name) >= 0)
    throw_error<InvalidArgument>("an expert named '", name, "' is already loaded (remove it first)");
  impl_->publish_adapters(impl_->adapters->with_expert(name, pieces));
}

void Engine::remove_expert(const std::string& name) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const int64_t slot = impl_->adapters->slot_of(name);
  if (slot < 0 || impl_->retiring.count(slot)) {
    std::string known;
    for (const auto& n : impl_->known_domains()) known += (known.empty() ? "" : ", ") + n;
    throw_error<InvalidArgument>("unknown expert '", name, "' (loaded: ", known, ")");
  }
  impl_->retiring.insert(slot);
  // Requests using it keep it under a name no request can give, so `name` can be loaded again.
  impl_->publish_adapters(impl_->adapters->with_name(slot, name + " (removed)"));  // routers stop choosing it
  impl_->free_retired();  // frees it at once if no request uses it
}

std::vector<std::string> Engine::experts() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  return impl_->known_domains();
}

void Engine::load_expert(const std::string& name, const std::string& peft_dir) {
  if (name.empty()) throw_error<InvalidArgument>("an expert needs a non-empty name");
  const engine::PeftAdapter adapter = engine::read_peft_adapter(peft_dir, name, &impl_->config);
  add_expert(name, adapter.targets);
}

std::vector<std::string> Engine::Impl::known_domains() const {
  std::vector<std::string> out;
  for (int64_t i = 0; i < adapters->slots(); ++i)
    if (!adapters->names()[i].empty() && !retiring.count(i)) out.push_back(adapters->names()[i]);
  return out;
}

void Engine::Impl::publish_adapters(std::shared_ptr<const engine::AdapterTable> table) {
  adapters = std::move(table);
  model->set_adapters(adapters);
  if (!router.empty()) {
    std::vector<int64_t> slots_of;
    for (const auto& d : router_domains) {
      const int64_t slot = adapters->slot_of(d);
      slots_of.push_back(slot >= 0 && !retiring.count(slot) ? slot : -1);
    }
    model->set_router(router, slots_of);
  }
}

void Engine::Impl::free_retired() {
  if (retiring.empty()) return;
  std::set<int64_t> used;
  auto mark = [&](const std::shared_ptr<Sequence>& s) {
    if (s)
      for (int64_t e : s->experts) used.insert(e);
  };
  for (const auto& s : slots) mark(s);
  for (const auto& s : waiting) mark(s);
  for (auto it = retiring.begin(); it != retiring.end();) {
    if (used.count(*it)) {
      ++it;
      continue;
    }
    const int64_t slot = *it;
    it = retiring.erase(it);
    publish_adapters(adapters->without_slot(slot));
  }
}

// -----------------------------------------------------------------------------------------
// Routers and MoA directories
// -----------------------------------------------------------------------------------------

void Engine::set_router(const std::vector<std::string>& domains, const std::vector<at::Tensor>& weights,
                        RoutingStrategy strategy) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const ModelConfig& c = impl_->config;
  if (domains.empty()) throw_error<InvalidArgument>("a router needs at least one domain");
  if (static_cast<int64_t>(weights.size()) != c.num_layers)
    throw_error<InvalidArgument>("router: expected one matrix per layer (", c.num_layers, "), got ", weights.size());
  std::vector<at::Tensor> router;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    if (w.dim() != 2 || w.size(0) != static_cast<int64_t>(domains.size()) || w.size(1) != c.hidden_size)
      throw_error<InvalidArgument>("router layer ", l, ": expected [", domains.size(), ", ", c.hidden_size,
                                   "] (domains x hidden), got ", w.sizes());
    router.push_back(w.to(at::kCPU, at::kFloat).contiguous());
    const std::string bad = engine::non_finite_summary(router.back());
    if (!bad.empty()) throw_error<InvalidArgument>("router layer ", l, " has non-finite values (", bad, ")");
  }
  impl_->router_domains = domains;
  impl_->router = std::move(router);
  impl_->strategy = strategy;
  impl_->publish_adapters(impl_->adapters);
}

std::vector<std::string> Engine::router_domains() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  return impl_->router_domains;
}

void Engine::load_moa(const std::string& moa_dir, std::optional<RoutingStrategy> strategy) {
  // Read and check everything first (the config is fixed after construction).
  const engine::MoaDirectory dir = engine::read_moa_dir(moa_dir, &impl_->config);
  if (strategy && dir.router.empty())
    throw_error<InvalidArgument>("routing '", to_string(*strategy), "' was given, but ", moa_dir,
                                 " has no router.safetensors");
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  for (const auto& e : dir.experts)
    if (impl_->adapters->slot_of(e.name) >= 0)
      throw_error<InvalidArgument>(moa_dir, ": an expert named '", e.name, "' is already loaded (remove it first)");
  std::vector<std::string> added;
  try {
    for (const auto& e : dir.experts) {
      add_expert(e.name, e.targets);
      added.push_back(e.name);
    }
    if (!dir.router.empty())
      set_router(dir.config.domains, dir.router, strategy ? *strategy : parse_routing_strategy(dir.config.strategy));
  } catch (...) {
    for (const auto& name : added) remove_expert(name);  // unused yet: freed at once
    throw;
  }
}

}  // namespace moa
