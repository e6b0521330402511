// The expert-grouped LoRA ops: one implementation per dispatch key.
//
// Dimension legend: T tokens, E experts, r rank, in / out feature sizes.
//   grouped_lora(x [T, in], lora_a [E, r, in], lora_b [E, out, r],
//                expert_ids [T], scales [E]) -> [T, out]
//   row t = scales[e] * (x[t] @ lora_a[e]^T) @ lora_b[e]^T with e = expert_ids[t];
//   zero where e = -1. grouped_lora_add_(y, ...) adds the same update into y.
// Training (CPU): _grouped_lora_add_v_(y, v, ...) is grouped_lora_add_ that also keeps the
// rank-r intermediate v = x A^T [T, r] (rows of expert -1 unwritten), and
// _grouped_lora_backward_(grad_x, grad, x, v, ...) takes it back: with u = grad B [T, r]
// formed once, grad_x += s u A, and returns (dA, dB) = (s u^T x, s grad^T v) per expert,
// so the backward neither recomputes v nor forms u twice.
// The schemas and registrations are in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moa::ops {

// Argument checks shared by every implementation (symbolic shapes included).
// `y` is the [T, out] tensor of the in-place op, or the incoming gradient; null if absent.
void check_grouped_lora_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& expert_ids, const at::Tensor& scales, const at::Tensor* y = nullptr,
                             const char* y_name = "y");
// Every id in [-1, E). Reads the ids on the host (a device sync off the CPU).
void check_expert_ids_range(const char* op, const at::Tensor& expert_ids, int64_t num_experts);

// CPU: the kernels in kernels/cpu.
at::Tensor grouped_lora_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& expert_ids, const at::Tensor& scales);
void grouped_lora_add_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          const at::Tensor& expert_ids, const at::Tensor& scales);
std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                 const at::Tensor& expert_ids,
                                                                 const at::Tensor& scales);

void grouped_lora_add_v_cpu(const at::Tensor& y, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales);
std::tuple<at::Tensor, at::Tensor> grouped_lora_backward_cpu(const at::Tensor& grad_x, const at::Tensor& grad,
                                                             const at::Tensor& x, const at::Tensor& v,
                                                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                             const at::Tensor& expert_ids, const at::Tensor& scales);

// Any device: built from ATen ops (CUDA tensors use these until kernels land).
at::Tensor grouped_lora_generic(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& expert_ids, const at::Tensor& scales);
void grouped_lora_add_generic(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales);
std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_generic(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                     const at::Tensor& expert_ids,
                                                                     const at::Tensor& scales);

// Meta (fake tensors, torch.compile): shapes only.
at::Tensor grouped_lora_meta(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& expert_ids, const at::Tensor& scales);
void grouped_lora_add_meta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& expert_ids, const at::Tensor& scales);
std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                  const at::Tensor& expert_ids,
                                                                  const at::Tensor& scales);

void grouped_lora_add_v_meta(const at::Tensor& y, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales);
std::tuple<at::Tensor, at::Tensor> grouped_lora_backward_meta(const at::Tensor& grad_x, const at::Tensor& grad,
                                                              const at::Tensor& x, const at::Tensor& v,
                                                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                              const at::Tensor& expert_ids, const at::Tensor& scales);
// The intermediate v of the training ops: [T, r], the dtype and device of x.
void check_lora_v(const char* op, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a);
// The gradient of x that _grouped_lora_backward_ adds into: x's shape, dtype and device.
void check_grad_x(const char* op, const at::Tensor& grad_x, const at::Tensor& x);

// Autograd: differentiable in x, lora_a and lora_b.
at::Tensor grouped_lora_autograd(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                 const at::Tensor& expert_ids, const at::Tensor& scales);

}  // namespace moa::ops
