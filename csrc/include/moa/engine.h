// Public C++ API of moa_core's inference engine: a Llama-family model (llama, mistral,
// qwen2) loaded from an HF folder (config.json + safetensors), a slot-based KV cache,
// continuous batching and sampling. The Python class moa_engine.Engine wraps this one
// and adds tokenization.
//
//   moa::Engine engine("/path/to/model", {.dtype = "auto", .max_batch = 16});
//   moa::GenerationRequest r;
//   r.prompt = {1, 2, 3};
//   r.max_new_tokens = 32;
//   auto results = engine.generate({r});   // results[0].token_ids
//
//   engine.load_moa("/path/to/moa_dir");   // Mixture-of-LoRAs experts and routers
//   r.domain = "code";                     // an expert; moa::kRoutedDomain lets the routers choose
//   r.routing = moa::RoutingStrategy::kVote;  // how they choose (none: the engine's strategy)
//
// Errors are moa::InvalidArgument, moa::FormatError or moa::FileNotFound (moa/errors.h).
// One Engine serves one caller at a time: its public methods lock an internal mutex.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moa/errors.h"
#include "moa/routing_strategy.h"

namespace moa {

// Domain names with a meaning of their own (GenerationRequest::domain, Engine::forward's
// domains, RoutingInfo::domain). kBaseDomain and kRoutedDomain are never an expert's name.
inline constexpr char kBaseDomain[] = "base";    // no expert: the base model
inline constexpr char kRoutedDomain[] = "";      // the routers choose the experts at prefill
inline constexpr char kMixedDomain[] = "mixed";  // RoutingInfo::domain when the layers' experts differ

// The architecture, as read from config.json.
struct ModelConfig {
  std::string model_type;  // "llama", "mistral" or "qwen2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // given, or hidden_size / num_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // llama3 rope scaling (rope_scaling.rope_type == "llama3"); factor 0 means none.
  double rope_llama3_factor = 0.0;
  double rope_llama3_low_freq_factor = 1.0;
  double rope_llama3_high_freq_factor = 4.0;
  int64_t rope_llama3_original_max_position = 8192;
  int64_t max_position_embeddings = 0;
  int64_t sliding_window = 0;   // 0: full causal attention
  bool attention_bias = false;  // q/k/v projections have biases (qwen2)
  bool tie_word_embeddings = false;
  std::string torch_dtype;             // the checkpoint's dtype as config.json names it ("" if absent)
  std::vector<int64_t> eos_token_ids;  // from generation_config.json, else config.json
  int64_t bos_token_id = -1;
};

struct SamplingParams {
  float temperature = 0.0f;      // 0: greedy
  int64_t top_k = 0;             // 0: no limit
  float top_p = 1.0f;            // 1: no nucleus cut
  std::optional<uint64_t> seed;  // none: a random seed
};

struct GenerationRequest {
  std::vector<int64_t> prompt;  // token ids, not empty
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  // Generation stops when the generated ids end with one of these sequences
  // (the ids stay in the output).
  std::vector<std::vector<int64_t>> stop_sequences;
  bool ignore_eos = false;  // do not stop on the model's EOS ids
  // Which LoRA expert serves the request: an expert's name, kBaseDomain (no expert), or
  // kRoutedDomain to let the routers choose at prefill (with no experts loaded, the base model).
  std::string domain = kRoutedDomain;
  // The routing strategy for this request when routed; none: the engine's (set_router,
  // load_moa).
  std::optional<RoutingStrategy> routing;
};

// How a request was served: its expert per layer and, when routed, the routers'
// probabilities.
struct RoutingInfo {
  std::string domain;                            // the expert, kBaseDomain, or kMixedDomain when layers differ
  std::vector<std::string> layer_domains;        // [num_layers]
  std::vector<std::vector<float>> router_probs;  // [num_layers][n_domains]; empty when not routed
};

enum class FinishReason {
  kStop,       // an EOS id, a stop sequence, or the callback asked to stop
  kLength,     // max_new_tokens generated
  kCancelled,  // cancel() was called
  kError,      // the request failed (non-finite logits); GenerationResult::error / StepEvent::error say why
};
const char* to_string(FinishReason reason);  // "stop", "length", "cancelled", "error"

struct GenerationResult {
  std::vector<int64_t> token_ids;  // generated ids only, EOS and stop ids included
  FinishReason finish_reason = FinishReason::kLength;
  RoutingInfo routing;
  std::string error;  // why it failed when finish_reason is kError, else empty
};

// One expert's LoRA weights for one target linear of one layer (PEFT's lora_A.weight,
// lora_B.weight and alpha / r).
struct LoraWeights {
  int64_t layer = 0;
  std::string module;  // "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
  at::Tensor lora_a;   // [r, in]
  at::Tensor lora_b;   // [out, r]
  float scale = 1.0f;
};

struct EngineOptions {
  std::string dtype = "auto";  // "auto" (the checkpoint's), "float32", "bfloat16", "float16"
  std::string device = "cpu";  // "cpu", or "cuda" / "cuda:N" in a build with CUDA
  // Where the forward runs: "auto" (MOA_ENGINE_BACKEND when set, else "cpu" on the CPU
  // and "cuda" on a CUDA device), "cpu" (the CPU kernels), "reference" (ATen ops alone,
  // any device: the slow, plain forward the others are tested against) or "cuda".
  std::string backend = "auto";
  int64_t max_batch = 16;             // KV-cache slots: sequences decoded together
  int64_t max_seq_len = 2048;         // prompt + generated tokens, per sequence
  int64_t max_prefill_tokens = 4096;  // prompt tokens admitted in one step (at least one prompt)
  // Quantize the float matrices on load: "q8_0", "q4_0", "q4_1" or "q4_k" (the layers'
  // projections in that type, the embedding and LM head in Q8_0; CPU only), or "" to
  // keep them as loaded. A GGUF file's quantized matrices keep their types either way.
  std::string quantization;
};

// One scheduler event: a token generated for a request, or its end.
struct StepEvent {
  int64_t request_id = -1;
  int64_t token = -1;  // -1 when no token came with the event (cancelled)
  bool finished = false;
  FinishReason finish_reason = FinishReason::kLength;  // valid when finished
  std::shared_ptr<const RoutingInfo> routing;          // on the request's first event
  std::string error;                                   // why it failed when finish_reason is kError, else empty
};

class Engine {
 public:
  // model_dir: an HF folder (config.json + safetensors), or a .gguf file, whose matrices
  // are served in their GGML types (weight-only quantized kernels, CPU only).
  explicit Engine(const std::string& model_dir, const EngineOptions& options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& config() const;
  const EngineOptions& options() const;
  at::ScalarType dtype() const;
  int64_t weight_bytes() const;      // bytes of the weights as held in memory
  std::string backend_name() const;  // where the forward runs: "cpu", "reference" or "cuda"

  // Called with (index into requests, token id) as each token is generated; return
  // false to finish that request now (finish reason "stop").
  using TokenCallback = std::function<bool(size_t index, int64_t token)>;

  // Runs the requests to completion with continuous batching: at most max_batch at a
  // time, a finished request's slot taken by the next waiting one at the next step.
  // Results are in request order. Requests submitted before and not yet finished are
  // served alongside.
  std::vector<GenerationResult> generate(const std::vector<GenerationRequest>& requests,
                                         const TokenCallback& on_token = nullptr);

  // Scores whole sequences with the generation forward: input_ids [B, T] (integer)
  // -> logits [B, T, vocab] float32. Uses no KV-cache slot.
  at::Tensor forward(const at::Tensor& input_ids);
  // The same with experts: domains holds one value for every row or one per row (an
  // expert, kBaseDomain, or kRoutedDomain to route over the row's tokens); routing, when not
  // null, receives each row's RoutingInfo. route_lens (empty, one value, or one per row; 0 or
  // >= T: the whole row) routes a row over its first route_len tokens only, as a request
  // whose prompt they are would be routed at prefill: scoring a response as it is served.
  // strategy: the routing strategy of the routed rows (none: the engine's), as
  // GenerationRequest::routing is for a request.
  at::Tensor forward(const at::Tensor& input_ids, const std::vector<std::string>& domains,
                     std::vector<RoutingInfo>* routing, const std::vector<int64_t>& route_lens = {},
                     std::optional<RoutingStrategy> strategy = std::nullopt);

  // The routers' choice for each prompt (token ids), as a request with that prompt would be
  // routed with `strategy` (none: the engine's), without generating or scoring anything: one
  // routing pass (every layer with per-layer routing, no KV cache, no logits) per
  // max_prefill_tokens of prompts. Needs routers.
  std::vector<RoutingInfo> route(const std::vector<std::vector<int64_t>>& prompts,
                                 std::optional<RoutingStrategy> strategy = std::nullopt);

  // The step-wise interface generate() runs on.
  int64_t submit(const GenerationRequest& request);  // checks it, queues it; returns its id
  std::vector<StepEvent> step();                     // admits waiting requests, prefills them, decodes one token
  void cancel(int64_t request_id);                   // finishes it at the next step (no-op if unknown)
  bool idle() const;                                 // nothing waiting or running

  // Mixture-of-LoRAs experts. Changes apply from the next step; requests in flight keep
  // the expert they started with (a removed expert's weights stay until they finish).
  void add_expert(const std::string& name, const std::vector<LoraWeights>& weights);
  void remove_expert(const std::string& name);  // InvalidArgument if unknown
  std::vector<std::string> experts() const;     // loaded experts, slot order
  // Routers: per layer a [domains.size(), hidden] matrix; domains name experts (those
  // not loaded are never chosen). strategy: the engine's strategy from now on.
  void set_router(const std::vector<std::string>& domains, const std::vector<at::Tensor>& weights,
                  RoutingStrategy strategy);
  std::vector<std::string> router_domains() const;

  // Loads a MoA directory (moa_config.json, experts/<domain>/ PEFT LoRA folders,
  // router.safetensors; the format is defined in moa_engine/moa_format.py): adds every
  // domain's expert and, when the directory has routers, sets them with `strategy` (none:
  // the directory's own). Everything is read and checked against the model before anything
  // changes; on error the engine is as it was. Throws FileNotFound or FormatError naming the
  // file and the problem, InvalidArgument for a strategy without routers or a domain
  // already loaded.
  // The same as moa_engine.Engine(model, experts=moa_dir, routing=strategy).
  void load_moa(const std::string& moa_dir, std::optional<RoutingStrategy> strategy = std::nullopt);
  // Loads one PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) as the
  // expert `name`; the same as moa_engine.Engine.add_expert(name, peft_dir).
  void load_expert(const std::string& name, const std::string& peft_dir);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moa
