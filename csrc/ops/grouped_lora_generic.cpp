// Device-generic implementation of the grouped LoRA ops, built from ATen ops. It
// serves every device without a hand-written kernel (CUDA today) and doubles as a
// second, independent implementation that the tests compare on CPU.
#include <ATen/ATen.h>

#include <vector>

#include "ops/grouped_lora.h"

namespace moa::ops {
namespace {

// Results are computed in float (double for double) and rounded to the input dtype
// once, as the contract says; only the rank-r intermediate is rounded on the way.
at::ScalarType opmath_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Below this many gathered weight elements (T * r * (in + out)) a call gathers
// each token's A and B and runs two bmm's: no host sync, no per-expert loop.
constexpr int64_t kGatherBmmLimit = int64_t(1) << 24;

// Tokens sorted by expert, with per-expert counts on the host (one sync).
struct Sorted {
  at::Tensor order;             // [T] token indices, ids ascending (-1 first)
  std::vector<int64_t> counts;  // [E + 1]: counts[0] for -1, counts[e + 1] for expert e
};

Sorted sort_by_expert(const at::Tensor& ids64, int64_t E) {
  Sorted s;
  s.order = at::argsort(ids64, /*stable=*/true);
  const at::Tensor counts = at::bincount(ids64 + 1, {}, E + 1).to(at::kCPU, at::kLong);
  s.counts.assign(counts.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>() + E + 1);
  return s;
}

at::Tensor update_gather_bmm(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& ids64, const at::Tensor& scales) {
  const auto opmath = opmath_type(x);
  const at::Tensor safe = ids64.clamp_min(0);
  const at::Tensor v = at::bmm(lora_a.index_select(0, safe), x.unsqueeze(2));  // [T, r, 1]
  const at::Tensor b = lora_b.index_select(0, safe).to(opmath);                // [T, out, r]
  const at::Tensor y = at::bmm(b, v.to(opmath)).squeeze(2);                    // [T, out]
  const at::Tensor factor = scales.index_select(0, safe).mul(ids64.ge(0));     // [T]
  return y.mul_(factor.unsqueeze(1).to(opmath));
}

at::Tensor update_sorted(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& ids64, const at::Tensor& scales) {
  const int64_t E = lora_a.size(0), out = lora_b.size(1);
  const Sorted s = sort_by_expert(ids64, E);
  const at::Tensor xs = x.index_select(0, s.order);
  const auto opmath = opmath_type(x);
  std::vector<at::Tensor> pieces{at::zeros({s.counts[0], out}, x.options().dtype(opmath))};
  int64_t offset = s.counts[0];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = s.counts[e + 1];
    if (n == 0) continue;
    const at::Tensor v = at::mm(xs.narrow(0, offset, n), lora_a[e].t());  // [n, r]
    pieces.push_back(at::mm(v.to(opmath), lora_b[e].t().to(opmath))       // [n, out]
                         .mul_(scales[e].to(opmath)));
    offset += n;
  }
  // order is a permutation of all T tokens, so every row is written.
  return at::empty({x.size(0), out}, x.options().dtype(opmath)).index_copy_(0, s.order, at::cat(pieces));
}

// The update of every token in float (double for double); arguments already checked.
at::Tensor update_opmath(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& expert_ids, const at::Tensor& scales) {
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), out = lora_b.size(1);
  check_expert_ids_range(op, expert_ids, E);
  if (T == 0 || E == 0 || r == 0 || in == 0 || out == 0) {
    return at::zeros({T, out}, x.options().dtype(opmath_type(x)));
  }
  const at::Tensor ids64 = expert_ids.to(at::kLong);
  if (T * r * (in + out) <= kGatherBmmLimit) {
    return update_gather_bmm(x, lora_a, lora_b, ids64, scales);
  }
  return update_sorted(x, lora_a, lora_b, ids64, scales);
}

}  // namespace

at::Tensor grouped_lora_generic(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales);
  return update_opmath(op, x, lora_a, lora_b, expert_ids, scales).to(x.scalar_type());
}

void grouped_lora_add_generic(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora_add_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &y);
  const at::Tensor update = update_opmath(op, x, lora_a, lora_b, expert_ids, scales);
  // y + update in float, rounded once; rows with id -1 are kept bit for bit.
  const at::Tensor updated = update.add_(y.to(update.scalar_type())).to(y.scalar_type());
  y.copy_(at::where(expert_ids.ge(0).unsqueeze(1), updated, y));
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_generic(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                     const at::Tensor& expert_ids,
                                                                     const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_weight_grads";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  const int64_t E = lora_a.size(0);
  check_expert_ids_range(op, expert_ids, E);
  at::Tensor grad_a = at::zeros(lora_a.sizes(), lora_a.options());  // [E, r, in]
  at::Tensor grad_b = at::zeros(lora_b.sizes(), lora_b.options());  // [E, out, r]
  if (x.size(0) == 0 || E == 0) return {grad_a, grad_b};
  const at::Tensor ids64 = expert_ids.to(at::kLong);
  const Sorted s = sort_by_expert(ids64, E);
  const at::Tensor xs = x.index_select(0, s.order);
  const at::Tensor gs = grad.index_select(0, s.order);
  int64_t offset = s.counts[0];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = s.counts[e + 1];
    if (n == 0) continue;
    const at::Tensor x_e = xs.narrow(0, offset, n);   // [n, in]
    const at::Tensor g_e = gs.narrow(0, offset, n);   // [n, out]
    const at::Tensor v = at::mm(x_e, lora_a[e].t());  // [n, r]
    const at::Tensor u = at::mm(g_e, lora_b[e]);      // [n, r]
    grad_a[e].copy_(at::mm(u.t(), x_e).mul_(scales[e]));
    grad_b[e].copy_(at::mm(g_e.t(), v).mul_(scales[e]));
    offset += n;
  }
  return {grad_a, grad_b};
}

}  // namespace moa::ops
