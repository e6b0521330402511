// The reference backend (backend_reference.h) and the backend factory (backend.h).
#include "engine/backend_reference.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>

#include "kernels/cpu/quant.h"
#include "moa/errors.h"

namespace moa::engine {
namespace {

// The q, k or v columns of qkv [N, Q + 2 KV] for rows [row, row + len) as [heads, len, D].
at::Tensor heads_of(const at::Tensor& qkv, int64_t row, int64_t len, int64_t col, int64_t heads, int64_t D) {
  return qkv.narrow(0, row, len).narrow(1, col, heads * D).unflatten(1, {heads, D}).transpose(0, 1);
}

// w dequantized into float32 [n, k] (CPU: the kernels' own dequantizers).
at::Tensor dequantized(const Matrix& w) {
  at::Tensor out = at::empty({w.n, w.k}, at::TensorOptions().dtype(at::kFloat));
  int64_t row = 0;
  for (const QuantRows& run : w.quant) {
    cpu::dequantize_rows(run.type, run.data.data_ptr<uint8_t>(), run.data.size(1), w.k, 0, run.rows,
                         out.data_ptr<float>() + row * w.k);
    row += run.rows;
  }
  return out;
}

}  // namespace

at::Tensor ReferenceBackend::rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) const {
  // LlamaRMSNorm: in float32, back to the input dtype, then times the weight.
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return w * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

void ReferenceBackend::rope_qk(const at::Tensor& qkv, const AttentionDims& d, const at::Tensor& positions,
                               const at::Tensor& table) const {
  // apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos and sin in x's dtype.
  const int64_t D = d.head_dim, half = D / 2;
  const at::Tensor rows = table.index_select(0, positions);  // [N, D]
  const at::Tensor cos = rows.narrow(1, 0, half).repeat({1, 2}).to(qkv.scalar_type()).unsqueeze(1);
  const at::Tensor sin = rows.narrow(1, half, half).repeat({1, 2}).to(qkv.scalar_type()).unsqueeze(1);
  const int64_t Q = d.n_heads * D;
  for (const auto& [col, heads] : {std::pair<int64_t, int64_t>{0, d.n_heads}, {Q, d.n_kv_heads}}) {
    at::Tensor x = qkv.narrow(1, col, heads * D).unflatten(1, {heads, D});  // [N, heads, D], a view
    const at::Tensor rotated = at::cat({-x.narrow(2, half, half), x.narrow(2, 0, half)}, 2);
    x.copy_(x * cos + rotated * sin);
  }
}

void ReferenceBackend::store(const at::Tensor& qkv, const AttentionDims& d, const SeqSpan& s,
                             const KvStores& stores) const {
  const int64_t D = d.head_dim, Q = d.n_heads * D, KV = d.n_kv_heads * D;
  const at::Tensor& k = s.scratch ? stores.scratch_k : stores.cache_k;
  const at::Tensor& v = s.scratch ? stores.scratch_v : stores.cache_v;
  k.select(0, s.index).narrow(1, s.start, s.len).copy_(heads_of(qkv, s.row, s.len, Q, d.n_kv_heads, D));
  v.select(0, s.index).narrow(1, s.start, s.len).copy_(heads_of(qkv, s.row, s.len, Q + KV, d.n_kv_heads, D));
}

void ReferenceBackend::store_kv(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs,
                                const KvStores& stores, const ForwardPlan*) const {
  for (const SeqSpan& s : seqs) store(qkv, d, s, stores);
}

void ReferenceBackend::attend(const at::Tensor& qkv, const AttentionDims& d, const SeqSpan& s, const KvStores& stores,
                              const at::Tensor& out) const {
  // Scaled dot-product attention in float32, the causal (and sliding-window) mask built
  // from positions.
  const int64_t D = d.head_dim, Q = d.n_heads * D;
  const int64_t group = d.n_heads / d.n_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const auto longs = at::TensorOptions().dtype(at::kLong).device(qkv.device());
  const at::Tensor& ks = s.scratch ? stores.scratch_k : stores.cache_k;
  const at::Tensor& vs = s.scratch ? stores.scratch_v : stores.cache_v;
  const int64_t L = s.start + s.len;
  at::Tensor k = ks.select(0, s.index).narrow(1, 0, L).to(at::kFloat);  // [nkv, L, D]
  at::Tensor v = vs.select(0, s.index).narrow(1, 0, L).to(at::kFloat);
  if (group > 1) k = k.repeat_interleave(group, 0), v = v.repeat_interleave(group, 0);
  const at::Tensor q = heads_of(qkv, s.row, s.len, 0, d.n_heads, D).to(at::kFloat);  // [nh, len, D]
  at::Tensor scores = at::matmul(q, k.transpose(1, 2)) * scale;                      // [nh, len, L]
  const at::Tensor pos_q = at::arange(s.start, L, longs).unsqueeze(1);
  const at::Tensor pos_k = at::arange(0, L, longs).unsqueeze(0);
  at::Tensor allowed = pos_k <= pos_q;
  if (d.window > 0) allowed = allowed & (pos_k > pos_q - d.window);
  scores.masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  const at::Tensor o = at::matmul(at::softmax(scores, -1), v);  // [nh, len, D]
  out.narrow(0, s.row, s.len).copy_(o.transpose(0, 1).reshape({s.len, Q}));
}

at::Tensor ReferenceBackend::attention(const at::Tensor& qkv, const AttentionDims& d, const std::vector<SeqSpan>& seqs,
                                       const KvStores& stores, const ForwardPlan*) const {
  at::Tensor out = at::empty({qkv.size(0), d.n_heads * d.head_dim}, qkv.options());
  for (const SeqSpan& s : seqs) attend(qkv, d, s, stores, out);
  return out;
}

at::Tensor ReferenceBackend::silu_mul(const at::Tensor& gu) const {
  const int64_t I = gu.size(1) / 2;
  return at::silu(gu.narrow(1, 0, I)) * gu.narrow(1, I, I);
}

at::Tensor ReferenceBackend::linear(const at::Tensor& x, const Matrix& w, const at::Tensor& b) const {
  if (!w.quantized()) return at::linear(x, w.dense, b);
  // Weight-only: float32 products with the dequantized rows, rounded once to x's dtype.
  const at::Tensor bf = b.defined() ? b.to(at::kFloat) : at::Tensor();
  return at::linear(x.to(at::kFloat), dequantized(w), bf).to(x.scalar_type());
}

void ReferenceBackend::lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                 const at::Tensor& ids, const at::Tensor& scales) const {
  // Per expert in the batch: gather its tokens, two float32 matmuls, scatter back.
  const at::Tensor experts = std::get<0>(at::_unique(ids)).to(at::kCPU);
  const int64_t* e = experts.data_ptr<int64_t>();
  for (int64_t i = 0; i < experts.numel(); ++i) {
    if (e[i] < 0) continue;
    const at::Tensor rows = (ids == e[i]).nonzero().squeeze(1);
    const at::Tensor xe = x.index_select(0, rows).to(at::kFloat);
    const at::Tensor delta = at::matmul(at::matmul(xe, a[e[i]].to(at::kFloat).t()), b[e[i]].to(at::kFloat).t());
    const at::Tensor updated = y.index_select(0, rows).to(at::kFloat) + delta * scales[e[i]];
    y.index_copy_(0, rows, updated.to(y.scalar_type()));
  }
}

at::Tensor ReferenceBackend::embedding(const Matrix& w, const at::Tensor& ids, at::ScalarType dtype) const {
  if (!w.quantized()) return w.dense.index_select(0, ids).to(dtype);
  return engine::embedding(w, ids, dtype);  // the looked-up rows alone, dequantized (CPU)
}

std::shared_ptr<const Backend> make_reference_backend() { return std::make_shared<ReferenceBackend>(); }

std::string resolve_backend_name(const std::string& name, const at::Device& device) {
  if (name != "auto") return name;
  if (const char* env = std::getenv("MOA_ENGINE_BACKEND"); env != nullptr && *env != '\0') {
    const std::string chosen = env;
    if (chosen != "auto") {
      if (chosen != "cpu" && chosen != "reference" && chosen != "cuda")
        throw_error<InvalidArgument>("MOA_ENGINE_BACKEND='", chosen,
                                     "' is not a backend (expected auto, cpu, reference or cuda)");
      return chosen;
    }
  }
  return device.is_cuda() ? "cuda" : "cpu";
}

std::shared_ptr<const Backend> make_backend(const std::string& requested, const at::Device& device) {
  const std::string name = resolve_backend_name(requested, device);
  if (name == "reference") return make_reference_backend();
  if (name == "cpu") {
    if (!device.is_cpu())
      throw_error<InvalidArgument>("backend 'cpu' runs on the CPU, not on device '", device.str(), "'");
    return make_cpu_backend();
  }
  if (name == "cuda") {
    if (!device.is_cuda()) throw_error<InvalidArgument>("backend 'cuda' needs a CUDA device, not '", device.str(), "'");
#ifdef MOA_WITH_CUDA
    return make_cuda_backend();
#else
    throw_error<InvalidArgument>(
        "backend 'cuda': this build of moa_engine has no CUDA (rebuild with MOA_ENGINE_CUDA=1)");
#endif
  }
  throw_error<InvalidArgument>("backend '", name, "' is not a backend (expected auto, cpu, reference or cuda)");
}

}  // namespace moa::engine
