// The Python extension module moa_engine._C. Importing it registers the
// torch.ops.moa.* operators (see ops/registration.cpp); the ops are reached only
// through torch.ops, never bound a second time here.
#include <torch/extension.h>

void bind_engine(pybind11::module_& m);      // engine_bindings.cpp
void bind_moa_format(pybind11::module_& m);  // moa_format_bindings.cpp
void bind_quant(pybind11::module_& m);       // quant_bindings.cpp
void bind_gguf(pybind11::module_& m);        // gguf_bindings.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moa_engine's compiled core. The ops are registered as torch.ops.moa.*.";
  m.def(
      "built_with_cuda",
      []() {
#ifdef MOA_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build of moa_engine._C compiled the CUDA sources.");
  bind_engine(m);
  bind_moa_format(m);
  bind_quant(m);
  bind_gguf(m);
}
