// Argument checks for the grouped LoRA ops. Every message names the argument, what
// was expected and what was given. Shapes are compared as SymInts so the same
// checks serve concrete tensors and symbolic (meta / fake) ones.
#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include "ops/grouped_lora.h"

namespace moa::ops {
namespace {

std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (the device of x), got ",
                    t.device());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " to have the dtype of x (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

}  // namespace

void check_grouped_lora_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& expert_ids, const at::Tensor& scales, const at::Tensor* y,
                             const char* y_name) {
  // Shapes.
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": expected x [T, in] (2-D), got a ", x.dim(), "-D tensor of shape ",
                    x.sym_sizes());
  const c10::SymInt T = x.sym_size(0);
  const c10::SymInt in = x.sym_size(1);
  TORCH_CHECK_VALUE(lora_a.dim() == 3 && lora_a.sym_size(2) == in, op, ": expected lora_a [E, r, in] with in=", in,
                    " (from x), got ", lora_a.sym_sizes());
  const c10::SymInt E = lora_a.sym_size(0);
  const c10::SymInt r = lora_a.sym_size(1);
  TORCH_CHECK_VALUE(lora_b.dim() == 3 && lora_b.sym_size(0) == E && lora_b.sym_size(2) == r, op,
                    ": expected lora_b [E, out, r] with E=", E, ", r=", r, " (from lora_a), got ", lora_b.sym_sizes());
  const c10::SymInt out = lora_b.sym_size(1);
  TORCH_CHECK_VALUE(expert_ids.dim() == 1 && expert_ids.sym_size(0) == T, op, ": expected expert_ids [T] with T=", T,
                    " (from x), got ", expert_ids.sym_sizes());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.sym_size(0) == E, op, ": expected scales [E] with E=", E,
                    " (from lora_a), got ", scales.sym_sizes());
  if (y != nullptr) {
    TORCH_CHECK_VALUE(y->dim() == 2 && y->sym_size(0) == T && y->sym_size(1) == out, op, ": expected ", y_name,
                      " [T, out] with T=", T, ", out=", out, " (from x and lora_b), got ", y->sym_sizes());
  }
  // Dtypes.
  TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()), op,
                   ": expected x to be float64, float32, bfloat16 or float16, got ", dtype_name(x.scalar_type()));
  check_same_dtype(op, "lora_a", lora_a, x);
  check_same_dtype(op, "lora_b", lora_b, x);
  if (y != nullptr) check_same_dtype(op, y_name, *y, x);
  TORCH_CHECK_TYPE(expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong, op,
                   ": expected expert_ids to be int32 or int64, got ", dtype_name(expert_ids.scalar_type()));
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": expected scales to be float32, got ",
                   dtype_name(scales.scalar_type()));
  // Devices.
  check_same_device(op, "lora_a", lora_a, x);
  check_same_device(op, "lora_b", lora_b, x);
  check_same_device(op, "expert_ids", expert_ids, x);
  check_same_device(op, "scales", scales, x);
  if (y != nullptr) check_same_device(op, y_name, *y, x);
}

void check_lora_v(const char* op, const at::Tensor& v, const at::Tensor& x, const at::Tensor& lora_a) {
  TORCH_CHECK_VALUE(v.dim() == 2 && v.sym_size(0) == x.sym_size(0) && v.sym_size(1) == lora_a.sym_size(1), op,
                    ": expected v [T, r] with T=", x.sym_size(0), ", r=", lora_a.sym_size(1),
                    " (from x and lora_a), got ", v.sym_sizes());
  check_same_dtype(op, "v", v, x);
  check_same_device(op, "v", v, x);
}

void check_grad_x(const char* op, const at::Tensor& grad_x, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_x.sym_sizes() == x.sym_sizes(), op, ": expected grad_x of x's shape ", x.sym_sizes(), ", got ",
                    grad_x.sym_sizes());
  check_same_dtype(op, "grad_x", grad_x, x);
  check_same_device(op, "grad_x", grad_x, x);
}

namespace {
template <typename Id>
void check_ids_on_host(const char* op, const Id* ids, int64_t T, int64_t E) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = static_cast<int64_t>(ids[t]);
    TORCH_CHECK_INDEX(e >= -1 && e < E, op, ": expert_ids[", t, "] = ", e, " is out of range [-1, ", E, ") for E=", E,
                      " experts");
  }
}
}  // namespace

void check_expert_ids_range(const char* op, const at::Tensor& expert_ids, int64_t E) {
  const int64_t T = expert_ids.size(0);
  if (T == 0) return;
  if (expert_ids.device().is_cpu()) {
    const at::Tensor ids = expert_ids.contiguous();
    if (ids.scalar_type() == at::kInt) {
      check_ids_on_host(op, ids.const_data_ptr<int32_t>(), T, E);
    } else {
      check_ids_on_host(op, ids.const_data_ptr<int64_t>(), T, E);
    }
    return;
  }
  const at::Tensor bad = expert_ids.lt(-1).logical_or_(expert_ids.ge(E));
  if (!bad.any().item<bool>()) return;
  // Error path only: bring the ids over to name the first offender.
  const at::Tensor host = expert_ids.to(at::kCPU, at::kLong);
  check_ids_on_host(op, host.const_data_ptr<int64_t>(), T, E);
}

}  // namespace moa::ops
