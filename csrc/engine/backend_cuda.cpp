// The CUDA backend (backend.h): the reference backend's structure, with CUDA kernels
// (kernels/cuda/transformer_cuda.h) for RMSNorm, RoPE, SiLU-and-multiply, the KV-cache
// store and decode attention (split-K over long contexts), the grouped-LoRA SGMV / BGMV
// kernels behind moa::grouped_lora_add_, and cuBLAS GEMMs through ATen. Prefill
// attention and scratch (scoring) stores take the reference's ATen path. Compiled in
// CUDA builds only (MOA_WITH_CUDA).
//
// Host traffic per forward: one copy of the forward's index arrays to the device (plan(),
// a few int64 per token and sequence), shared by every layer; nothing is read back here.
#ifdef MOA_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/backend_reference.h"
#include "kernels/cuda/transformer_cuda.h"
#include "moa/ops.h"

namespace moa::engine {
namespace {

// The kernels' element type for an ATen dtype.
template <typename Fn>
void dispatch(at::ScalarType type, const char* what, Fn&& fn) {
  switch (type) {
    case at::kFloat: return fn(static_cast<float*>(nullptr));
    case at::kHalf: return fn(static_cast<__half*>(nullptr));
    case at::kBFloat16: return fn(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, "moa cuda backend: ", what, ": dtype ", type, " is not float32, float16 or bfloat16");
  }
}

template <typename K>
K* ptr(const at::Tensor& t) {
  return reinterpret_cast<K*>(t.data_ptr());
}

at::Tensor device_longs(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::kLong).to(device, /*non_blocking=*/true);
}

constexpr int64_t kMaxKernelHeadDim = 256;  // the decode-attention kernel's register tile
constexpr int64_t kSplitKeys = 512;         // keys per split-K block

// The forward's device index arrays: index = [dst (rows) | decode rows | bases | lengths].
struct Plan final : ForwardPlan {
  at::Tensor index;
  int64_t rows = 0;        // N
  int64_t decode = 0;      // sequences that take the decode-attention kernel
  int64_t longest = 0;     // their longest context
  bool any_cache = false;  // rows stored in the cache (by the store kernel)
};

class CudaBackend final : public ReferenceBackend {
 public:
  const char* name() const override { return "cuda"; }

  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) const override {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t N = x.size(0), H = x.size(1);
    TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "moa cuda backend: rms_norm needs unit column strides");
    at::Tensor y = at::empty({N, H}, x.options());
    dispatch(x.scalar_type(), "rms_norm", [&](auto* tag) {
      using K = std::remove_pointer_t<decltype(tag)>;
      cuda::rms_norm<K>(ptr<K>(x), x.stride(0), ptr<K>(w), ptr<K>(y), N, H, eps, stream());
    });
    return y;
  }

  void rope_qk(const at::Tensor& qkv, const AttentionDims& d, const at::Tensor& positions,
               const at::Tensor& table) const override {
    const c10::cuda::CUDAGuard guard(qkv.device());
    const int64_t N = qkv.size(0), Q = d.n_heads * d.head_dim;
    dispatch(qkv.scalar_type(), "rope", [&](auto* tag) {
      using K = std::remove_pointer_t<decltype(tag)>;
      K* q = ptr<K>(qkv);
      const int64_t* pos = positions.data_ptr<int64_t>();
      cuda::rope<K>(q, qkv.stride(0), N, d.n_heads, d.head_dim, pos, table.data_ptr<float>(), stream());
      cuda::rope<K>(q + Q, qkv.stride(0), N, d.n_kv_heads, d.head_dim, pos, table.data_ptr<float>(), stream());
    });
  }

  // One host-to-device copy per forward: every cache row's store offset, and the decode
  // sequences' query rows, store offsets and lengths.
  std::unique_ptr<ForwardPlan> plan(const std::vector<SeqSpan>& seqs, const KvStores& stores) const override {
    auto p = std::make_unique<Plan>();
    int64_t N = 0;
    for (const SeqSpan& s : seqs) N = std::max(N, s.row + s.len);
    p->rows = N;
    std::vector<int64_t> dst(N, -1), rows, base, lens;
    for (const SeqSpan& s : seqs) {
      if (s.scratch) continue;
      const at::Tensor& k = stores.cache_k;
      for (int64_t i = 0; i < s.len; ++i) dst[s.row + i] = s.index * k.stride(0) + (s.start + i) * k.stride(2);
      p->any_cache = true;
      if (s.len == 1) {
        rows.push_back(s.row);
        base.push_back(s.index * k.stride(0));
        lens.push_back(s.start + 1);
        p->longest = std::max(p->longest, s.start + 1);
      }
    }
    p->decode = static_cast<int64_t>(rows.size());
    dst.insert(dst.end(), rows.begin(), rows.end());
    dst.insert(dst.end(), base.begin(), base.end());
    dst.insert(dst.end(), lens.begin(), lens.end());
    if (!dst.empty()) p->index = device_longs(dst, stores.cache_k.defined() ? stores.cache_k.device() : at::kCPU);
    return p;
  }

  void store_kv(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs, const KvStores& stores,
                const ForwardPlan* plan) const override {
    const c10::cuda::CUDAGuard guard(qkv.device());
    const Plan& p = *static_cast<const Plan*>(plan);
    for (const SeqSpan& s : seqs)  // scoring's scratch stores: the reference's copies
      if (s.scratch) store(qkv, d, s, stores);
    if (!p.any_cache) return;
    const int64_t N = qkv.size(0), D = d.head_dim, Q = d.n_heads * D, KV = d.n_kv_heads * D;
    dispatch(qkv.scalar_type(), "store_kv", [&](auto* tag) {
      using K = std::remove_pointer_t<decltype(tag)>;
      cuda::store_kv<K>(ptr<K>(qkv), qkv.stride(0), N, Q, Q + KV, d.n_kv_heads, D, p.index.data_ptr<int64_t>(),
                        stores.cache_k.stride(1), ptr<K>(stores.cache_k), ptr<K>(stores.cache_v), stream());
    });
  }

  at::Tensor attention(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs,
                       const KvStores& stores, const ForwardPlan* plan) const override {
    const c10::cuda::CUDAGuard guard(qkv.device());
    const Plan& p = *static_cast<const Plan*>(plan);
    at::Tensor out = at::empty({qkv.size(0), d.n_heads * d.head_dim}, qkv.options());
    // Decode rows (one new token in a cache slot) in one launch; the rest (prefill,
    // scoring) through the reference.
    const bool kernel = p.decode > 0 && d.head_dim <= kMaxKernelHeadDim;
    for (const SeqSpan& s : seqs)
      if (!kernel || s.len != 1 || s.scratch) attend(qkv, d, s, stores, out);
    if (!kernel) return out;
    const int64_t S = p.decode;
    cuda::DecodeAttention shape;
    shape.n_heads = d.n_heads;
    shape.n_kv_heads = d.n_kv_heads;
    shape.head_dim = d.head_dim;
    shape.head_stride = stores.cache_k.stride(1);
    shape.window = d.window;
    shape.scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
    shape.chunk = kSplitKeys;
    shape.n_chunks = (p.longest + kSplitKeys - 1) / kSplitKeys;
    at::Tensor partials;
    if (shape.n_chunks > 1) {
      partials = at::empty({S, d.n_heads, shape.n_chunks, d.head_dim + 2}, qkv.options().dtype(at::kFloat));
      shape.partials = partials.data_ptr<float>();
    }
    const int64_t* idx = p.index.data_ptr<int64_t>() + p.rows;  // rows, base, lens
    dispatch(qkv.scalar_type(), "attention", [&](auto* tag) {
      using K = std::remove_pointer_t<decltype(tag)>;
      cuda::decode_attention<K>(ptr<K>(qkv), qkv.stride(0), ptr<K>(out), out.stride(0), idx, idx + S, idx + 2 * S, S,
                                ptr<K>(stores.cache_k), ptr<K>(stores.cache_v), shape, stream());
    });
    return out;
  }

  at::Tensor silu_mul(const at::Tensor& gu) const override {
    const c10::cuda::CUDAGuard guard(gu.device());
    const int64_t N = gu.size(0), I = gu.size(1) / 2;
    at::Tensor act = at::empty({N, I}, gu.options());
    dispatch(gu.scalar_type(), "silu_mul", [&](auto* tag) {
      using K = std::remove_pointer_t<decltype(tag)>;
      cuda::silu_mul<K>(ptr<K>(gu), gu.stride(0), ptr<K>(act), N, I, stream());
    });
    return act;
  }

  void lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& ids, const at::Tensor& scales) const override {
    moa::grouped_lora_add_(y, x, a, b, ids, scales);  // the SGMV / BGMV kernels
  }

 private:
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
};

}  // namespace

std::shared_ptr<const Backend> make_cuda_backend() { return std::make_shared<CudaBackend>(); }

}  // namespace moa::engine

#endif  // MOA_WITH_CUDA
