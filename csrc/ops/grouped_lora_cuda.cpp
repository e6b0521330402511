// CUDA implementation of the grouped LoRA ops: argument checks, layout fix-ups, workspaces
// and dtype mapping around the kernels in kernels/cuda, registered for the CUDA dispatch
// key. Compiled in CUDA builds only (MOA_WITH_CUDA); elsewhere CUDA tensors would take the
// device-generic ATen implementation (grouped_lora_generic.cpp).
//
// A call launches its kernels on the current stream (gather: 2; segment: a device plan of 3
// or 4, then 2), with no host sync except the expert_ids range check, which is skipped while
// the stream is being captured into a CUDA graph (the kernels treat ids outside [0, E) as -1,
// so bad ids never index out of bounds). Forward calls take the gather or the segment kernel
// (moa::cuda::use_segment_path); MOA_ENGINE_CUDA_PATH=gather|segment|auto, read per call,
// forces one (tests and tuning; the gather kernel serves ranks up to 256 only).
#ifdef MOA_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "kernels/cuda/grouped_lora_cuda.h"
#include "kernels/cuda/tiling.h"
#include "ops/grouped_lora.h"

namespace moa::ops {
namespace {

namespace kc = moa::cuda;

kc::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kc::Dtype::kFloat16;
    case at::kBFloat16: return kc::Dtype::kBFloat16;
    case at::kFloat: return kc::Dtype::kFloat32;
    default:  // checked: float64
      return kc::Dtype::kFloat64;
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

enum class Path { kAuto, kGather, kSegment };

Path path_override() {
  const char* value = std::getenv("MOA_ENGINE_CUDA_PATH");
  const std::string path = value == nullptr ? "" : value;
  TORCH_CHECK_VALUE(path.empty() || path == "auto" || path == "gather" || path == "segment",
                    "MOA_ENGINE_CUDA_PATH must be auto, gather or segment, got '", path, "'");
  return path == "gather" ? Path::kGather : path == "segment" ? Path::kSegment : Path::kAuto;
}

bool use_segment(int64_t T, int64_t E, int64_t r) {
  if (r > moa::cuda::tiling::kGatherMaxRank) return true;  // the gather kernel's limit
  switch (path_override()) {
    case Path::kGather: return false;
    case Path::kSegment: return true;
    default: return kc::use_segment_path(T, E, r);
  }
}

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

// The range check syncs with the host, which a graph capture forbids.
void check_ids(const char* op, const at::Tensor& expert_ids, int64_t E) {
  if (!capturing()) check_expert_ids_range(op, expert_ids, E);
}

// The kernels read rows with a unit column stride.
at::Tensor with_unit_columns(const at::Tensor& t) { return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous(); }
// ... and write rows that do not overlap.
bool writable_rows(const at::Tensor& t) { return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)); }
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

struct Shapes {
  int64_t T, in, E, r, out;
};

Shapes shapes_of(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  return {x.size(0), x.size(1), lora_a.size(0), lora_a.size(1), lora_b.size(1)};
}

void check_launch(cudaError_t status, const char* op, const char* kernel, const Shapes& s) {
  TORCH_CHECK(status == cudaSuccess, op, ": the CUDA ", kernel, " failed (", cudaGetErrorString(status),
              ") for T=", s.T, ", in=", s.in, ", out=", s.out, ", r=", s.r, ", E=", s.E);
}

void check_sizes(const char* op, const Shapes& s) {
  TORCH_CHECK_VALUE(s.T <= std::numeric_limits<int32_t>::max() && s.E < std::numeric_limits<int32_t>::max() - 2, op,
                    ": the CUDA kernels take T < 2^31 tokens and E < 2^31 - 2 experts, got T=", s.T, ", E=", s.E);
}

// The device plan; `workspace` keeps its memory alive for the call.
kc::Plan plan_call(const char* op, const at::Tensor& expert_ids, const Shapes& s, cudaStream_t stream,
                   at::Tensor& workspace) {
  const at::Tensor ids = expert_ids.contiguous();
  const size_t bytes = kc::plan_workspace_bytes(s.T, s.E);
  workspace = at::empty({static_cast<int64_t>(bytes)}, ids.options().dtype(at::kByte));
  kc::Plan plan;
  check_launch(kc::make_plan(ids.const_data_ptr(), ids.scalar_type() == at::kLong, s.T, s.E,
                             workspace.mutable_data_ptr(), bytes, stream, &plan),
               op, "plan", s);
  return plan;
}

// y = (accumulate ? y : 0) + the grouped update. y: [T, out] with writable rows; every size
// > 0; arguments checked.
void run_forward(const char* op, const at::Tensor& y, const at::Tensor& x_in, const at::Tensor& lora_a,
                 const at::Tensor& lora_b, const at::Tensor& expert_ids, const at::Tensor& scales, bool accumulate) {
  const Shapes s = shapes_of(x_in, lora_a, lora_b);
  check_sizes(op, s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = with_unit_columns(x_in);
  const at::Tensor a = lora_a.contiguous();      // [E, r, in]
  const at::Tensor b = lora_b.contiguous();      // [E, out, r]
  const at::Tensor scale = scales.contiguous();  // [E]
  const kc::Dtype dtype = kernel_dtype(x.scalar_type());
  if (use_segment(s.T, s.E, s.r)) {
    at::Tensor plan_memory;
    const kc::Plan plan = plan_call(op, expert_ids, s, stream, plan_memory);
    const at::Tensor v = at::empty({s.T, s.r}, x.options());  // V by sorted position
    check_launch(kc::segment_shrink(dtype, plan, {x.const_data_ptr(), row_stride(x), true}, a.const_data_ptr(), s.in,
                                    s.r, v.mutable_data_ptr(), stream),
                 op, "segment shrink", s);
    check_launch(kc::segment_expand(dtype, plan, {v.const_data_ptr(), s.r, false}, b.const_data_ptr(),
                                    scale.const_data_ptr<float>(), s.out, s.r, y.mutable_data_ptr(), row_stride(y),
                                    accumulate, stream),
                 op, "segment expand", s);
    return;
  }
  const at::Tensor id_values = expert_ids.contiguous();
  const kc::Ids ids{id_values.const_data_ptr(), id_values.scalar_type() == at::kLong, s.T, s.E};
  const int64_t splits = kc::gather_splits(s.in);
  const at::Tensor partials = at::empty({splits, s.T, s.r}, x.options().dtype(acc_type(x.scalar_type())));
  check_launch(kc::gather_shrink(dtype, ids, x.const_data_ptr(), row_stride(x), a.const_data_ptr(), s.in, s.r,
                                 partials.mutable_data_ptr(), stream),
               op, "gather shrink", s);
  check_launch(kc::gather_expand(dtype, ids, partials.const_data_ptr(), splits, b.const_data_ptr(),
                                 scale.const_data_ptr<float>(), s.out, s.r, y.mutable_data_ptr(), row_stride(y),
                                 accumulate, stream),
               op, "gather expand", s);
}

bool nothing_to_add(const Shapes& s) { return s.T == 0 || s.E == 0 || s.r == 0 || s.in == 0 || s.out == 0; }

at::Tensor grouped_lora_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales);
  check_ids(op, expert_ids, lora_a.size(0));
  const Shapes s = shapes_of(x, lora_a, lora_b);
  if (nothing_to_add(s)) return at::zeros({s.T, s.out}, x.options());
  at::Tensor y = at::empty({s.T, s.out}, x.options());  // every element written
  run_forward(op, y, x, lora_a, lora_b, expert_ids, scales, /*accumulate=*/false);
  return y;
}

void grouped_lora_add_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& expert_ids, const at::Tensor& scales) {
  constexpr const char* op = "moa.grouped_lora_add_";
  check_grouped_lora_args(op, x, lora_a, lora_b, expert_ids, scales, &y);
  check_ids(op, expert_ids, lora_a.size(0));
  if (nothing_to_add(shapes_of(x, lora_a, lora_b))) return;
  const bool in_place = writable_rows(y);
  const at::Tensor target = in_place ? y : y.contiguous();
  run_forward(op, target, x, lora_a, lora_b, expert_ids, scales, /*accumulate=*/true);
  if (!in_place) y.copy_(target);
}

// dA[e] = s_e U_e^T X_e with U = g B (per token), dB[e] = s_e G_e^T V_e with V = x A^T:
// two segment shrinks, then two segment weight-gradient GEMMs over each expert's tokens.
std::tuple<at::Tensor, at::Tensor> grouped_lora_weight_grads_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                  const at::Tensor& expert_ids,
                                                                  const at::Tensor& scales) {
  constexpr const char* op = "moa._grouped_lora_weight_grads";
  check_grouped_lora_args(op, x_in, lora_a, lora_b, expert_ids, scales, &grad, "grad");
  check_ids(op, expert_ids, lora_a.size(0));
  const Shapes s = shapes_of(x_in, lora_a, lora_b);
  if (nothing_to_add(s)) {
    return {at::zeros(lora_a.sizes(), lora_a.options()), at::zeros(lora_b.sizes(), lora_b.options())};
  }
  check_sizes(op, s);
  TORCH_CHECK_VALUE(s.E <= kc::kMaxGridYZ, op, ": the CUDA weight gradients take up to ", kc::kMaxGridYZ,
                    " experts, got E=", s.E);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = with_unit_columns(x_in);               // [T, in]
  const at::Tensor g = with_unit_columns(grad);               // [T, out]
  const at::Tensor a = lora_a.contiguous();                   // [E, r, in]
  const at::Tensor bt = lora_b.transpose(1, 2).contiguous();  // B^T: [E, r, out]
  const at::Tensor scale = scales.contiguous();
  at::Tensor plan_memory;
  const kc::Plan plan = plan_call(op, expert_ids, s, stream, plan_memory);
  const kc::Dtype dtype = kernel_dtype(x.scalar_type());
  const kc::Rows x_rows{x.const_data_ptr(), row_stride(x), true};
  const kc::Rows g_rows{g.const_data_ptr(), row_stride(g), true};

  const at::Tensor v = at::empty({s.T, s.r}, x.options());  // V = x A^T, by sorted position
  const at::Tensor u = at::empty({s.T, s.r}, x.options());  // U = g B,   by sorted position
  check_launch(kc::segment_shrink(dtype, plan, x_rows, a.const_data_ptr(), s.in, s.r, v.mutable_data_ptr(), stream), op,
               "segment shrink (x A^T)", s);
  check_launch(kc::segment_shrink(dtype, plan, g_rows, bt.const_data_ptr(), s.out, s.r, u.mutable_data_ptr(), stream),
               op, "segment shrink (g B)", s);

  auto weight_grad = [&](const kc::Rows& L, const kc::Rows& R, int64_t M, int64_t N, const at::Tensor& dW,
                         const char* what) {
    const int64_t splits = kc::weight_grad_splits(dtype, s.T, s.E, M, N);
    at::Tensor workspace;
    if (splits > 1) {
      workspace = at::empty({splits * s.E * M * N}, x.options().dtype(acc_type(x.scalar_type())));
    }
    check_launch(kc::segment_weight_grad(dtype, plan, L, R, M, N, scale.const_data_ptr<float>(), dW.mutable_data_ptr(),
                                         splits > 1 ? workspace.mutable_data_ptr() : nullptr, splits, stream),
                 op, what, s);
  };
  at::Tensor grad_a = at::empty(lora_a.sizes(), lora_a.options());  // [E, r, in], all written
  at::Tensor grad_b = at::empty(lora_b.sizes(), lora_b.options());  // [E, out, r], all written
  weight_grad({u.const_data_ptr(), s.r, false}, x_rows, s.r, s.in, grad_a, "segment weight gradient (dA)");
  weight_grad(g_rows, {v.const_data_ptr(), s.r, false}, s.out, s.r, grad_b, "segment weight gradient (dB)");
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace moa::ops

TORCH_LIBRARY_IMPL(moa, CUDA, m) {
  m.impl("grouped_lora", &moa::ops::grouped_lora_cuda);
  m.impl("grouped_lora_add_", &moa::ops::grouped_lora_add_cuda);
  m.impl("_grouped_lora_weight_grads", &moa::ops::grouped_lora_weight_grads_cuda);
}

#endif  // MOA_WITH_CUDA
