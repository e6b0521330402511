// The public C++ entry points (include/moa/ops.h): typed dispatcher calls.
#include <ATen/core/dispatch/Dispatcher.h>

#include "moa/ops.h"

namespace moa {

at::Tensor grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& expert_ids, const at::Tensor& scales) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("moa::grouped_lora", "").typed<decltype(grouped_lora)>();
  return op.call(x, lora_a, lora_b, expert_ids, scales);
}

void grouped_lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& expert_ids, const at::Tensor& scales) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("moa::grouped_lora_add_", "").typed<decltype(grouped_lora_add_)>();
  op.call(y, x, lora_a, lora_b, expert_ids, scales);
}

}  // namespace moa
