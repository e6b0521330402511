// Schemas and per-dispatch-key registrations of the torch.ops.moa namespace.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops/grouped_lora.h"

TORCH_LIBRARY(moa, m) {
  m.def(
      "grouped_lora(Tensor x, Tensor lora_a, Tensor lora_b, Tensor expert_ids, Tensor scales)"
      " -> Tensor");
  m.def(
      "grouped_lora_add_(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b,"
      " Tensor expert_ids, Tensor scales) -> ()");
  // The device-generic implementation under its own name, so tests can run it on CPU.
  m.def(
      "_grouped_lora_generic(Tensor x, Tensor lora_a, Tensor lora_b, Tensor expert_ids,"
      " Tensor scales) -> Tensor");
  // Backward of grouped_lora for the weights: (grad_lora_a, grad_lora_b).
  m.def(
      "_grouped_lora_weight_grads(Tensor grad, Tensor x, Tensor lora_a, Tensor lora_b,"
      " Tensor expert_ids, Tensor scales) -> (Tensor, Tensor)");
  // Training (CPU): grouped_lora_add_ keeping v = x A^T, and the backward that reuses it
  // (see ops/grouped_lora.h). Inside an autograd.Function; no autograd of their own.
  m.def(
      "_grouped_lora_add_v_(Tensor(a!) y, Tensor(b!) v, Tensor x, Tensor lora_a, Tensor lora_b,"
      " Tensor expert_ids, Tensor scales) -> ()");
  m.def(
      "_grouped_lora_backward_(Tensor(a!) grad_x, Tensor grad, Tensor x, Tensor v, Tensor lora_a,"
      " Tensor lora_b, Tensor expert_ids, Tensor scales) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moa, CPU, m) {
  m.impl("grouped_lora", &moa::ops::grouped_lora_cpu);
  m.impl("grouped_lora_add_", &moa::ops::grouped_lora_add_cpu);
  m.impl("_grouped_lora_weight_grads", &moa::ops::grouped_lora_weight_grads_cpu);
  m.impl("_grouped_lora_add_v_", &moa::ops::grouped_lora_add_v_cpu);
  m.impl("_grouped_lora_backward_", &moa::ops::grouped_lora_backward_cpu);
}

// Every other device: ATen ops. A device-specific registration (CPU above, CUDA
// kernels later) takes precedence over these.
TORCH_LIBRARY_IMPL(moa, CompositeExplicitAutograd, m) {
  m.impl("grouped_lora", &moa::ops::grouped_lora_generic);
  m.impl("grouped_lora_add_", &moa::ops::grouped_lora_add_generic);
  m.impl("_grouped_lora_generic", &moa::ops::grouped_lora_generic);
  m.impl("_grouped_lora_weight_grads", &moa::ops::grouped_lora_weight_grads_generic);
}

TORCH_LIBRARY_IMPL(moa, Meta, m) {
  m.impl("grouped_lora", &moa::ops::grouped_lora_meta);
  m.impl("grouped_lora_add_", &moa::ops::grouped_lora_add_meta);
  m.impl("_grouped_lora_generic", &moa::ops::grouped_lora_meta);
  m.impl("_grouped_lora_weight_grads", &moa::ops::grouped_lora_weight_grads_meta);
  m.impl("_grouped_lora_add_v_", &moa::ops::grouped_lora_add_v_meta);
  m.impl("_grouped_lora_backward_", &moa::ops::grouped_lora_backward_meta);
}

TORCH_LIBRARY_IMPL(moa, Autograd, m) {
  m.impl("grouped_lora", &moa::ops::grouped_lora_autograd);
  // Inference-only ops: fine without grad; backward through them raises a clear error.
  m.impl("grouped_lora_add_", torch::autograd::autogradNotImplementedFallback());
  m.impl("_grouped_lora_generic", torch::autograd::autogradNotImplementedFallback());
  m.impl("_grouped_lora_weight_grads", torch::autograd::autogradNotImplementedFallback());
  m.impl("_grouped_lora_add_v_", torch::autograd::autogradNotImplementedFallback());
  m.impl("_grouped_lora_backward_", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(moa, ADInplaceOrView, m) {
  m.impl("grouped_lora_add_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  m.impl("_grouped_lora_add_v_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  m.impl("_grouped_lora_backward_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}
