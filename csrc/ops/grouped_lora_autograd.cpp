// Autograd for moa::grouped_lora. With y_t = s_e B_e A_e x_t (e = expert_ids[t]):
//   dx_t  = s_e A_e^T B_e^T g_t      -> the same op on the transposed weights
//   dA_e  = s_e sum_t (B_e^T g_t) x_t^T
//   dB_e  = s_e sum_t g_t (A_e x_t)^T  -> moa::_grouped_lora_weight_grads
// expert_ids and scales get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "moa/ops.h"
#include "ops/grouped_lora.h"

namespace moa::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_weight_grads(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                     const at::Tensor& expert_ids, const at::Tensor& scales) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moa::_grouped_lora_weight_grads", "")
                             .typed<decltype(grouped_lora_weight_grads_cpu)>();
  return op.call(grad, x, lora_a, lora_b, expert_ids, scales);
}

struct GroupedLoraFunction : public torch::autograd::Function<GroupedLoraFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales) {
    ctx->save_for_backward({x, lora_a, lora_b, expert_ids, scales});
    at::AutoDispatchBelowADInplaceOrView guard;
    return moa::grouped_lora(x, lora_a, lora_b, expert_ids, scales);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &lora_a = saved[1], &lora_b = saved[2];
    const at::Tensor &expert_ids = saved[3], &scales = saved[4];
    const at::Tensor& grad = grad_outputs[0];  // [T, out]
    at::Tensor grad_x, grad_a, grad_b;
    if (ctx->needs_input_grad(0)) {
      // lora_b^T: [E, r, out] plays A, lora_a^T: [E, in, r] plays B.
      grad_x = moa::grouped_lora(grad, lora_b.transpose(1, 2), lora_a.transpose(1, 2), expert_ids, scales);
    }
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      std::tie(grad_a, grad_b) = call_weight_grads(grad, x, lora_a, lora_b, expert_ids, scales);
      if (!ctx->needs_input_grad(1)) grad_a = at::Tensor();
      if (!ctx->needs_input_grad(2)) grad_b = at::Tensor();
    }
    return {grad_x, grad_a, grad_b, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor grouped_lora_autograd(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                 const at::Tensor& expert_ids, const at::Tensor& scales) {
  return GroupedLoraFunction::apply(x, lora_a, lora_b, expert_ids, scales);
}

}  // namespace moa::ops
