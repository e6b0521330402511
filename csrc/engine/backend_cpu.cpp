// The CPU backend (backend.h): the engine's hand-written kernels (kernels/cpu) through
// raw pointers, the dense and quantized linears of linear.h, and the grouped-LoRA op.
#include <ATen/ATen.h>

#include <cmath>
#include <cstring>

#include "engine/backend.h"
#include "engine/dispatch.h"
#include "kernels/cpu/transformer_cpu.h"
#include "moa/ops.h"

namespace moa::engine {
namespace {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) const override {
    const int64_t N = x.size(0), H = x.size(1);
    at::Tensor y = at::empty({N, H}, x.options());
    MOA_DISPATCH_ENGINE_TYPES(x.scalar_type(), "moa_rms_norm", [&] {
      cpu::rms_norm<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), H, N,
                              H, eps);
    });
    return y;
  }

  void rope_qk(const at::Tensor& qkv, const AttentionDims& d, const at::Tensor& positions,
               const at::Tensor& table) const override {
    const int64_t N = qkv.size(0), Q = d.n_heads * d.head_dim;
    const int64_t* pos = positions.data_ptr<int64_t>();
    const float* tab = table.data_ptr<float>();
    MOA_DISPATCH_ENGINE_TYPES(qkv.scalar_type(), "moa_rope", [&] {
      scalar_t* q = qkv.data_ptr<scalar_t>();
      cpu::rope<scalar_t>(q, qkv.stride(0), N, d.n_heads, d.head_dim, pos, tab);
      cpu::rope<scalar_t>(q + Q, qkv.stride(0), N, d.n_kv_heads, d.head_dim, pos, tab);
    });
  }

  void store_kv(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs, const KvStores& stores,
                const ForwardPlan*) const override {
    const int64_t D = d.head_dim, Q = d.n_heads * D, KV = d.n_kv_heads * D, ld = qkv.stride(0);
    const int64_t bytes = D * static_cast<int64_t>(qkv.element_size());
    const auto* base = static_cast<const char*>(qkv.data_ptr());
    for (const SeqSpan& s : seqs) {
      const at::Tensor& k = s.scratch ? stores.scratch_k : stores.cache_k;
      const at::Tensor& v = s.scratch ? stores.scratch_v : stores.cache_v;
      const int64_t es = k.element_size();
      char* kb = static_cast<char*>(k.data_ptr()) + s.index * k.stride(0) * es;
      char* vb = static_cast<char*>(v.data_ptr()) + s.index * v.stride(0) * es;
      for (int64_t i = 0; i < s.len; ++i) {
        const char* src = base + (s.row + i) * ld * es;
        for (int64_t g = 0; g < d.n_kv_heads; ++g) {
          const int64_t off = (g * k.stride(1) + (s.start + i) * k.stride(2)) * es;
          std::memcpy(kb + off, src + (Q + g * D) * es, bytes);
          std::memcpy(vb + off, src + (Q + KV + g * D) * es, bytes);
        }
      }
    }
  }

  at::Tensor attention(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs,
                       const KvStores& stores, const ForwardPlan*) const override {
    const int64_t N = qkv.size(0), D = d.head_dim, Q = d.n_heads * D;
    at::Tensor out = at::empty({N, Q}, qkv.options());
    cpu::AttentionShape shape;
    shape.n_heads = d.n_heads;
    shape.n_kv_heads = d.n_kv_heads;
    shape.head_dim = D;
    shape.kv_pos_stride = D;
    shape.window = d.window;
    shape.scale = 1.0f / std::sqrt(static_cast<float>(D));
    MOA_DISPATCH_ENGINE_TYPES(qkv.scalar_type(), "moa_attention", [&] {
      using T = scalar_t;
      // Slots and scratch share the [.., nkv, capacity, D] layout but not the capacity:
      // one kernel call for each.
      for (const bool scratch : {false, true}) {
        const at::Tensor& k = scratch ? stores.scratch_k : stores.cache_k;
        const at::Tensor& v = scratch ? stores.scratch_v : stores.cache_v;
        std::vector<cpu::AttentionSeq<T>> group;
        for (const SeqSpan& s : seqs)
          if (s.scratch == scratch)
            group.push_back({s.row, s.len, s.start, k.data_ptr<T>() + s.index * k.stride(0),
                             v.data_ptr<T>() + s.index * v.stride(0)});
        if (group.empty()) continue;
        shape.kv_head_stride = k.stride(1);
        cpu::attention<T>(qkv.data_ptr<T>(), qkv.stride(0), out.data_ptr<T>(), Q, group.data(),
                          static_cast<int64_t>(group.size()), shape);
      }
    });
    return out;
  }

  at::Tensor silu_mul(const at::Tensor& gu) const override {
    const int64_t N = gu.size(0), I = gu.size(1) / 2;
    at::Tensor act = at::empty({N, I}, gu.options());
    MOA_DISPATCH_ENGINE_TYPES(gu.scalar_type(), "moa_silu_mul", [&] {
      cpu::silu_mul<scalar_t>(gu.data_ptr<scalar_t>(), gu.stride(0), act.data_ptr<scalar_t>(), I, N, I);
    });
    return act;
  }

  at::Tensor linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b) const override {
    return engine::linear(x, w, b);
  }

  void lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& ids, const at::Tensor& scales) const override {
    moa::grouped_lora_add_(y, x, a, b, ids, scales);
  }

  at::Tensor embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype) const override {
    return engine::embedding(w, ids, dtype);
  }
};

}  // namespace

std::shared_ptr<const Backend> make_cpu_backend() { return std::make_shared<CpuBackend>(); }

}  // namespace moa::engine
