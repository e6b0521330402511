// Meta (shape-only) implementations: what fake tensors and torch.compile see.
// Shapes stay symbolic, so dynamic-shape tracing works.
#include <ATen/ATen.h>

#include "ops/grouped_lora.h"

namespace moa::ops {

at::Tensor grouped_lora_meta(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& expert_ids, const at::Tensor& scales) {
  check_grouped_lora_args("moa.grouped_lora", x, lora_a, lora_b, expert_ids, scales);
  return at::empty_symint({x.sym_size(0), lora_b.sym_size(1)}, x.options());
}

void grouped_lora_add_meta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& expert_ids, const at::Tensor& scales) {
  check_grouped_lora_args("moa.grouped_lora_add_", x, lora_a, lora_b, expert_ids, scales, &y);
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                  const at::Tensor& expert_ids,
                                                                  const at::Tensor& scales) {
  check_grouped_lora_args("moa._grouped_lora_weight_grads", x, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  return {at::empty_symint(lora_a.sym_sizes(), lora_a.options()),
          at::empty_symint(lora_b.sym_sizes(), lora_b.options())};
}

void grouped_lora_add_v_meta(const at::Tensor& y, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_add_v_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &y);
  check_lora_v(op, v, x, lora_a);
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_backward_meta(const at::Tensor& grad_x, const at::Tensor& grad,
                                                              const at::Tensor& x, const at::Tensor& v,
                                                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                              const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_backward_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  check_lora_v(op, v, x, lora_a);
  check_grad_x(op, grad_x, x);
  return {at::empty_symint(lora_a.sym_sizes(), lora_a.options()),
          at::empty_symint(lora_b.sym_sizes(), lora_b.options())};
}

}  // namespace moa::ops
