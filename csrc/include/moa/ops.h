// Public C++ API of moa_core's operators. The calls go through the PyTorch
// dispatcher, exactly as torch.ops.moa.* does from Python, so device dispatch and
// autograd apply.
//
// Dimension legend: T tokens, E experts, r rank, in / out feature sizes.
#pragma once

#include <ATen/core/Tensor.h>

namespace moa {

// Semantics: out[t] = scales[e] * (x[t] @ lora_a[e]^T) @ lora_b[e]^T, e = expert_ids[t];
// out[t] = 0 where e == -1.
//   x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T] int32/int64,
//   scales [E] float32  ->  [T, out].
// Experts of lower rank are zero-padded to r. Differentiable in x, lora_a, lora_b.
// Throws c10::ValueError / c10::TypeError / c10::IndexError on bad arguments.
at::Tensor grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& expert_ids, const at::Tensor& scales);

// Semantics: y[t] += scales[e] * (x[t] @ lora_a[e]^T) @ lora_b[e]^T; rows with e == -1
// are untouched. y [T, out]. Inference only.
void grouped_lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& expert_ids, const at::Tensor& scales);

}  // namespace moa
