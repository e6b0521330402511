// CPU implementation of the grouped LoRA ops: argument checks, layout fix-ups and
// dtype dispatch around the kernels in kernels/cpu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "kernels/cpu/grouped_lora_cpu.h"
#include "ops/grouped_lora.h"

namespace moa::ops {
namespace {

// BLAS needs a unit column stride and rows that do not overlap.
bool blas_ready(const at::Tensor& t) { return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)); }
at::Tensor as_blas_ready(const at::Tensor& t) { return blas_ready(t) ? t : t.contiguous(); }
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

template <typename scalar_t>
cpu::Plan make_plan(const at::Tensor& expert_ids, int64_t num_experts) {
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t T = ids.size(0);
  const cpu::PlanOptions options = cpu::plan_options<scalar_t>();
  if (ids.scalar_type() == at::kInt) {
    return cpu::make_plan(ids.const_data_ptr<int32_t>(), T, num_experts, options);
  }
  return cpu::make_plan(ids.const_data_ptr<int64_t>(), T, num_experts, options);
}

// y += grouped update; arguments already checked. v_out: where to keep V = x A^T
// (contiguous [T, r]), or undefined for a scratch V.
void add_update(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                const at::Tensor& expert_ids, const at::Tensor& scales, const at::Tensor& v_out = at::Tensor()) {
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), out = lora_b.size(1);
  if (T == 0 || r == 0 || in == 0 || out == 0) return;
  const at::Tensor xr = as_blas_ready(x);
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor target = blas_ready(y) ? y : y.contiguous();
  const at::Tensor v = v_out.defined() ? v_out : at::empty({T, r}, x.options());  // V: [T, r]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora", [&] {
    const cpu::Plan plan = make_plan<scalar_t>(expert_ids, E);
    cpu::shrink<scalar_t>(plan, xr.const_data_ptr<scalar_t>(), row_stride(xr), a.const_data_ptr<scalar_t>(),
                          v.mutable_data_ptr<scalar_t>(), in, r);
    cpu::expand_add<scalar_t>(plan, v.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                              s.const_data_ptr<float>(), target.mutable_data_ptr<scalar_t>(), row_stride(target), out,
                              r);
  });
  if (!target.is_same(y)) y.copy_(target);
}

}  // namespace

at::Tensor grouped_lora_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales);
  check_expert_ids_range(op, expert_ids, lora_a.size(0));
  at::Tensor y = at::zeros({x.size(0), lora_b.size(1)}, x.options());
  add_update(y, x, lora_a, lora_b, expert_ids, scales);
  return y;
}

void grouped_lora_add_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora_add_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &y);
  check_expert_ids_range(op, expert_ids, lora_a.size(0));
  add_update(y, x, lora_a, lora_b, expert_ids, scales);
}

namespace {

// The backward of the update, arguments checked: returns (dA, dB) and, when grad_x is
// defined, adds the transposed update into it. v: V = x A^T kept from the forward, or
// undefined to form it here. U = grad B is formed once for both.
//   dA[e] = s_e U_e^T X_e: [r, in];   dB[e] = s_e G_e^T V_e: [out, r];   grad_x += s_e U A_e
std::tuple<at::Tensor, at::Tensor> backward_update(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& v,
                                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                   const at::Tensor& expert_ids, const at::Tensor& scales,
                                                   const at::Tensor& grad_x) {
  at::Tensor grad_a = at::zeros(lora_a.sizes(), lora_a.options());  // [E, r, in]
  at::Tensor grad_b = at::zeros(lora_b.sizes(), lora_b.options());  // [E, out, r]
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), out = lora_b.size(1);
  if (T == 0 || r == 0 || in == 0 || out == 0) return {grad_a, grad_b};
  const at::Tensor xr = as_blas_ready(x);
  const at::Tensor g = as_blas_ready(grad);
  const at::Tensor bt = lora_b.transpose(1, 2).contiguous();  // B^T: [E, r, out]
  const at::Tensor s = scales.contiguous();
  const at::Tensor vc = v.defined() ? v.contiguous() : at::empty({T, r}, x.options());
  const at::Tensor u = at::empty({T, r}, x.options());
  at::Tensor target;
  if (grad_x.defined()) target = blas_ready(grad_x) ? grad_x : grad_x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora_backward", [&] {
    const cpu::Plan plan = make_plan<scalar_t>(expert_ids, E);
    if (!v.defined()) {
      const at::Tensor a = lora_a.contiguous();
      cpu::shrink<scalar_t>(plan, xr.const_data_ptr<scalar_t>(), row_stride(xr), a.const_data_ptr<scalar_t>(),
                            vc.mutable_data_ptr<scalar_t>(), in, r);
    }
    cpu::shrink<scalar_t>(plan, g.const_data_ptr<scalar_t>(), row_stride(g), bt.const_data_ptr<scalar_t>(),
                          u.mutable_data_ptr<scalar_t>(), out, r);
    if (target.defined()) {
      // expand with A^T [E, in, r] in the place of B [E, out, r]
      const at::Tensor at_ = lora_a.transpose(1, 2).contiguous();
      cpu::expand_add<scalar_t>(plan, u.const_data_ptr<scalar_t>(), at_.const_data_ptr<scalar_t>(),
                                s.const_data_ptr<float>(), target.mutable_data_ptr<scalar_t>(), row_stride(target), in,
                                r);
    }
    cpu::weight_grad<scalar_t>(plan, u.const_data_ptr<scalar_t>(), r, xr.const_data_ptr<scalar_t>(), row_stride(xr),
                               s.const_data_ptr<float>(), grad_a.mutable_data_ptr<scalar_t>(), r, in);
    cpu::weight_grad<scalar_t>(plan, g.const_data_ptr<scalar_t>(), row_stride(g), vc.const_data_ptr<scalar_t>(), r,
                               s.const_data_ptr<float>(), grad_b.mutable_data_ptr<scalar_t>(), out, r);
  });
  if (target.defined() && !target.is_same(grad_x)) grad_x.copy_(target);
  return {grad_a, grad_b};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                 const at::Tensor& expert_ids,
                                                                 const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_weight_grads";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  check_expert_ids_range(op, expert_ids, lora_a.size(0));
  return backward_update(grad, x, at::Tensor(), lora_a, lora_b, expert_ids, scales, at::Tensor());
}

void grouped_lora_add_v_cpu(const at::Tensor& y, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_add_v_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &y);
  check_lora_v(op, v, x, lora_a);
  TORCH_CHECK_VALUE(v.is_contiguous(), op, ": expected v contiguous");
  check_expert_ids_range(op, expert_ids, lora_a.size(0));
  add_update(y, x, lora_a, lora_b, expert_ids, scales, v);
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_backward_cpu(const at::Tensor& grad_x, const at::Tensor& grad,
                                                             const at::Tensor& x, const at::Tensor& v,
                                                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                             const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_backward_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  check_lora_v(op, v, x, lora_a);
  check_grad_x(op, grad_x, x);
  check_expert_ids_range(op, expert_ids, lora_a.size(0));
  return backward_update(grad, x, v, lora_a, lora_b, expert_ids, scales, grad_x);
}

}  // namespace moa::ops
