// moa_engine._C's quantized-kernel entry points, for tests and benchmarks: the engine's
// own linear over a quantized matrix, the dequantizers, and the kernel choice.
#include <torch/extension.h>

#include "engine/linear.h"
#include "engine/weights.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/quantize.h"
#include "moa/errors.h"

namespace py = pybind11;

namespace {

moa::cpu::QTypeInfo info_of(int64_t type_id) {
  const auto info = moa::cpu::qtype_info(static_cast<uint32_t>(type_id));
  if (!info)
    moa::throw_error<moa::InvalidArgument>("GGML type ", moa::cpu::ggml_type_name(static_cast<uint32_t>(type_id)),
                                           " is not served (served: ", moa::cpu::served_qtype_names(), ")");
  return *info;
}

// raw: uint8 [n, row_bytes] of GGML blocks, k elements per row.
moa::engine::Matrix matrix_of(const at::Tensor& raw, int64_t type_id, int64_t k) {
  const moa::cpu::QTypeInfo info = info_of(type_id);
  if (raw.scalar_type() != at::kByte || raw.dim() != 2 || !raw.is_contiguous())
    moa::throw_error<moa::InvalidArgument>("raw must be a contiguous uint8 [rows, row_bytes] tensor");
  if (k <= 0 || k % info.block_elems != 0 || raw.size(1) != moa::cpu::qtype_row_bytes(info, k))
    moa::throw_error<moa::InvalidArgument>("k=", k, " does not match ", info.name, " rows of ", raw.size(1),
                                           " bytes (blocks of ", info.block_elems, " elements, ", info.block_bytes,
                                           " bytes)");
  moa::engine::Matrix m;
  m.n = raw.size(0), m.k = k;
  m.quant.push_back({static_cast<moa::cpu::QType>(type_id), raw, raw.size(0)});
  return m;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def(
      "_dequantize",
      [](const at::Tensor& raw, int64_t type_id, int64_t k) {
        const moa::engine::Matrix w = matrix_of(raw, type_id, k);
        at::Tensor out = at::empty({w.n, k}, at::kFloat);
        py::gil_scoped_release nogil;
        moa::cpu::dequantize_rows(w.quant[0].type, raw.data_ptr<uint8_t>(), raw.size(1), k, 0, w.n,
                                  out.data_ptr<float>());
        return out;
      },
      py::arg("raw"), py::arg("type_id"), py::arg("k"),
      "Rows of GGML blocks (uint8 [n, row_bytes]) as float32 [n, k].");
  m.def(
      "_quantize",
      [](const at::Tensor& x, int64_t type_id) {
        const moa::cpu::QTypeInfo info = info_of(type_id);
        const auto type = static_cast<moa::cpu::QType>(type_id);
        if (!moa::cpu::can_quantize(type))
          moa::throw_error<moa::InvalidArgument>("cannot quantize to ", info.name,
                                                 " (writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K)");
        if (x.dim() != 2) moa::throw_error<moa::InvalidArgument>("x must be 2-D [rows, k], got ", x.dim(), "-D");
        const int64_t k = x.size(1);
        if (k <= 0 || k % info.block_elems != 0)
          moa::throw_error<moa::InvalidArgument>(info.name, " needs rows of a multiple of ", info.block_elems,
                                                 " elements, got ", k);
        py::gil_scoped_release nogil;
        return moa::engine::quantize_dense(x, type);
      },
      py::arg("x"), py::arg("type_id"),
      "float rows [n, k] as GGML blocks of type_id (uint8 [n, row_bytes]), as ggml's reference quantizers "
      "write them.");
  m.def(
      "_quant_linear",
      [](const at::Tensor& x, const at::Tensor& raw, int64_t type_id, int64_t k, std::optional<at::Tensor> bias) {
        const moa::engine::Matrix w = matrix_of(raw, type_id, k);
        if (x.dim() != 2 || x.size(1) != k) moa::throw_error<moa::InvalidArgument>("x must be [M, ", k, "]");
        py::gil_scoped_release nogil;
        return moa::engine::linear(x, w, bias.value_or(at::Tensor()));
      },
      py::arg("x"), py::arg("raw"), py::arg("type_id"), py::arg("k"), py::arg("bias") = py::none(),
      "The engine's linear, x @ W^T (+ bias), over a quantized W.");
  m.def(
      "_embedding",
      [](const at::Tensor& raw, int64_t type_id, int64_t k, const at::Tensor& ids) {
        return moa::engine::embedding(matrix_of(raw, type_id, k), ids, at::kFloat);
      },
      py::arg("raw"), py::arg("type_id"), py::arg("k"), py::arg("ids"));
  m.def(
      "_quant_isa", []() { return std::string(moa::cpu::quant_isa_name(moa::cpu::quant_isa())); },
      "The quantized kernels in use: 'avx512_vnni' (the int8 path), 'avx512_bf16' (the bfloat16 path), "
      "'avx512' or 'portable'.");
  m.def("_set_quant_isa", &moa::cpu::set_quant_isa, py::arg("name"),
        "Sets the quantized kernels to 'portable', 'avx512', 'avx512_vnni', 'avx512_bf16' or 'auto' / "
        "'weight_only'; "
        "returns the choice now in use.");
}
