// Where the model forward runs. Model (model.h) says what happens, in transformers'
// order; a Backend says where: the CPU kernels, the portable ATen reference, or CUDA.
// The scheduler, routing decisions, hot expert changes and the C++ API never see a
// backend: they hand Model a Batch, and Model calls one of these for every step.
//
//   cpu        kernels/cpu (picked at load time by the instruction set found); dense
//              or quantized (GGML block) weights. The default on a CPU device.
//   reference  ATen ops alone, in the rounding order of transformers' Llama modules:
//              runs on any device, and is what the tests compare the others to.
//              Quantized matrices are dequantized per call (CPU only).
//   cuda       the reference's structure with the grouped-LoRA CUDA kernels behind the
//              op and cuBLAS GEMMs (through ATen); built with MOA_WITH_CUDA only.
//
// Chosen by EngineOptions::backend ("auto": cpu on a CPU device, cuda on a CUDA one),
// or for "auto" by MOA_ENGINE_BACKEND=cpu|reference|cuda, read per engine.
//
// Dimension legend: N tokens in the packed batch, H hidden size, D head dim,
// nh / nkv heads, Q = nh * D, KV = nkv * D, I intermediate size.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/linear.h"

namespace moa::engine {

// A forward's K/V stores at one layer: the cache's slots and the scratch rows of
// sequences that have none (scoring). Each is [stores, nkv, capacity, D], or undefined.
struct KvStores {
  at::Tensor cache_k, cache_v;
  at::Tensor scratch_k, scratch_v;
};

// One sequence of the packed batch, as the K/V store and attention see it: its new
// tokens are rows [row, row + len) at positions start, start + 1, ...; its keys and
// values live in store `index` of the cache (scratch: false) or of the scratch.
struct SeqSpan {
  int64_t row = 0;
  int64_t len = 0;
  int64_t start = 0;
  bool scratch = false;
  int64_t index = 0;
};

// The attention layout: qkv rows hold q (nh heads of D), then k and v (nkv heads each).
struct AttentionDims {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t window = 0;  // 0: full causal; else each query sees its last `window` positions
};

// What a backend derives once per forward from the batch's spans and reuses at every layer
// (the CUDA backend: the device index arrays of its store and attention kernels). Opaque.
struct ForwardPlan {
  virtual ~ForwardPlan() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // The plan of a forward over these spans; `stores` are layer 0's (every layer's stores
  // share their shapes and strides). Null: the backend needs none. store_kv and attention
  // then receive it at every layer.
  virtual std::unique_ptr<ForwardPlan> plan(const std::vector<SeqSpan>& seqs, const KvStores& stores) const {
    (void)seqs, (void)stores;
    return nullptr;
  }

  // y = w * rms_norm(x) for rows of x [N, H] (row stride any, unit column stride) -> [N, H].
  virtual at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) const = 0;
  // Rotary embedding in place on qkv [N, Q + 2 KV]'s q and k heads; positions [N] int64
  // on the device; table [max_pos, D] float32 (cos in [:, :D/2], sin in [:, D/2:]).
  virtual void rope_qk(const at::Tensor& qkv, const AttentionDims& dims, const at::Tensor& positions,
                       const at::Tensor& table) const = 0;
  // Writes each sequence's new keys and values (qkv's k and v columns) into its store.
  virtual void store_kv(const at::Tensor& qkv, const AttentionDims& dims, const std::vector<SeqSpan>& seqs,
                        const KvStores& stores, const ForwardPlan* plan) const = 0;
  // Causal attention of qkv's queries over their sequences' stores (written by store_kv
  // for these tokens) -> [N, Q]. GQA: head h reads kv head h / (nh / nkv).
  virtual at::Tensor attention(const at::Tensor& qkv, const AttentionDims& dims, const std::vector<SeqSpan>& seqs,
                               const KvStores& stores, const ForwardPlan* plan) const = 0;
  // gu [N, 2I] (gate, then up) -> silu(gate) * up [N, I].
  virtual at::Tensor silu_mul(const at::Tensor& gu) const = 0;
  // y = x W^T (+ b) in x's dtype.
  virtual at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b) const = 0;
  // y[t] += scales[e] * (x[t] @ a[e]^T) @ b[e]^T for every token t with e = ids[t] >= 0.
  virtual void lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& ids, const at::Tensor& scales) const = 0;
  // Rows ids [N] of w as [N, k] in dtype.
  virtual at::Tensor embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype) const = 0;
};

// The backend `name` ("auto", "cpu", "reference", "cuda") for weights on `device`.
// Throws InvalidArgument naming the backend and why it cannot serve there (an unknown
// name, cpu on a non-CPU device, cuda in a build without CUDA or on a CPU device).
std::shared_ptr<const Backend> make_backend(const std::string& name, const at::Device& device);

// The name make_backend resolves "auto" to: MOA_ENGINE_BACKEND when set, else cpu on a
// CPU device and cuda on a CUDA device.
std::string resolve_backend_name(const std::string& name, const at::Device& device);

std::shared_ptr<const Backend> make_cpu_backend();
std::shared_ptr<const Backend> make_reference_backend();
#ifdef MOA_WITH_CUDA
std::shared_ptr<const Backend> make_cuda_backend();
#endif

}  // namespace moa::engine
