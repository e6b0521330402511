// Python bindings of moa::Engine (include/moa/engine.h) as moa_engine._C.Engine. The
// Python class moa_engine.Engine wraps it with tokenization; this layer only converts
// types, releases the GIL while the engine works, and maps moa's exceptions to
// ValueError / FileNotFoundError / RuntimeError.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>

#include "engine/linear.h"
#include "kernels/cpu/decode_avx2.h"
#include "kernels/cpu/decode_avx512.h"
#include "moa/engine.h"

namespace py = pybind11;

namespace {

// Messages may quote bytes from a corrupt file: invalid UTF-8 is replaced, not allowed
// to turn the error into a UnicodeDecodeError.
void set_error(PyObject* type, const char* what) {
  PyObject* text = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
  if (text == nullptr) {
    PyErr_Clear();
    PyErr_SetString(type, "moa_engine: error message could not be decoded");
    return;
  }
  PyErr_SetObject(type, text);
  Py_DECREF(text);
}

void register_exceptions() {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const moa::FileNotFound& e) {
      set_error(PyExc_FileNotFoundError, e.what());
    } catch (const moa::InvalidArgument& e) {
      set_error(PyExc_ValueError, e.what());
    } catch (const moa::FormatError& e) {
      set_error(PyExc_ValueError, e.what());
    } catch (const moa::Error& e) {
      set_error(PyExc_RuntimeError, e.what());
    }
  });
}

}  // namespace

// Every ModelConfig field, named as ModelConfig names it (engine.config, _gguf_config).
py::dict model_config_dict(const moa::ModelConfig& c) {
  py::dict d;
  d["model_type"] = c.model_type;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_layers"] = c.num_layers;
  d["num_heads"] = c.num_heads;
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["rope_theta"] = c.rope_theta;
  d["rope_llama3_factor"] = c.rope_llama3_factor;
  d["rope_llama3_low_freq_factor"] = c.rope_llama3_low_freq_factor;
  d["rope_llama3_high_freq_factor"] = c.rope_llama3_high_freq_factor;
  d["rope_llama3_original_max_position"] = c.rope_llama3_original_max_position;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["sliding_window"] = c.sliding_window;
  d["attention_bias"] = c.attention_bias;
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  d["torch_dtype"] = c.torch_dtype;
  d["eos_token_ids"] = c.eos_token_ids;
  d["bos_token_id"] = c.bos_token_id;
  return d;
}

namespace {

// The Python face names strategies as strings, "" for the engine's own: the one place
// they become RoutingStrategy values.
std::optional<moa::RoutingStrategy> strategy_or_default(const std::string& name) {
  if (name.empty()) return std::nullopt;
  return moa::parse_routing_strategy(name);
}

std::string strategy_name(const std::optional<moa::RoutingStrategy>& strategy) {
  return strategy ? moa::to_string(*strategy) : "";
}

// SamplingParams, GenerationRequest, RoutingInfo, GenerationResult, StepEvent.
void bind_request_types(py::module_& m) {
  py::class_<moa::SamplingParams>(m, "SamplingParams", "Sampling settings of one request.")
      .def(py::init<>())
      .def_readwrite("temperature", &moa::SamplingParams::temperature)
      .def_readwrite("top_k", &moa::SamplingParams::top_k)
      .def_readwrite("top_p", &moa::SamplingParams::top_p)
      .def_readwrite("seed", &moa::SamplingParams::seed);

  py::class_<moa::GenerationRequest>(m, "GenerationRequest", "One prompt (token ids) to generate from.")
      .def(py::init<>())
      .def_readwrite("prompt", &moa::GenerationRequest::prompt)
      .def_readwrite("max_new_tokens", &moa::GenerationRequest::max_new_tokens)
      .def_readwrite("sampling", &moa::GenerationRequest::sampling)
      .def_readwrite("stop_sequences", &moa::GenerationRequest::stop_sequences)
      .def_readwrite("ignore_eos", &moa::GenerationRequest::ignore_eos)
      .def_readwrite("domain", &moa::GenerationRequest::domain)
      .def_property(
          "routing", [](const moa::GenerationRequest& r) { return strategy_name(r.routing); },
          [](moa::GenerationRequest& r, const std::string& name) { r.routing = strategy_or_default(name); },
          "The routing strategy when routed: 'per_layer', 'last', 'vote', or '' for the engine's.");

  py::class_<moa::RoutingInfo>(m, "RoutingInfo",
                               "The expert that served a request, per layer, and the router's probabilities.")
      .def_readonly("domain", &moa::RoutingInfo::domain)
      .def_readonly("layer_domains", &moa::RoutingInfo::layer_domains)
      .def_readonly("router_probs", &moa::RoutingInfo::router_probs);

  py::class_<moa::GenerationResult>(m, "GenerationResult", "Generated token ids and why generation ended.")
      .def_readonly("token_ids", &moa::GenerationResult::token_ids)
      .def_property_readonly("finish_reason",
                             [](const moa::GenerationResult& r) { return moa::to_string(r.finish_reason); })
      .def_readonly("routing", &moa::GenerationResult::routing)
      .def_property_readonly("error", [](const moa::GenerationResult& r) -> py::object {
        if (r.error.empty()) return py::none();
        return py::str(r.error);
      });

  py::class_<moa::StepEvent>(m, "StepEvent", "A token generated for a request, or its end.")
      .def_readonly("request_id", &moa::StepEvent::request_id)
      .def_readonly("token", &moa::StepEvent::token)
      .def_readonly("finished", &moa::StepEvent::finished)
      .def_property_readonly("routing",
                             [](const moa::StepEvent& e) -> py::object {
                               if (!e.routing) return py::none();
                               return py::cast(*e.routing);
                             })
      .def_property_readonly("finish_reason",
                             [](const moa::StepEvent& e) -> py::object {
                               if (!e.finished) return py::none();
                               return py::str(moa::to_string(e.finish_reason));
                             })
      .def_property_readonly("error", [](const moa::StepEvent& e) -> py::object {
        if (e.error.empty()) return py::none();
        return py::str(e.error);
      });
}

using EngineClass = py::class_<moa::Engine>;

// The constructor and what it loaded: config, dtype, sizes.
void bind_loading(EngineClass& engine) {
  engine
      .def(py::init([](const std::string& model_dir, const std::string& dtype, const std::string& device,
                       int64_t max_batch, int64_t max_seq_len, int64_t max_prefill_tokens,
                       const std::string& quantization, const std::string& backend) {
             moa::EngineOptions o;
             o.dtype = dtype;
             o.device = device;
             o.max_batch = max_batch;
             o.max_seq_len = max_seq_len;
             o.max_prefill_tokens = max_prefill_tokens;
             o.quantization = quantization;
             o.backend = backend;
             return std::make_unique<moa::Engine>(model_dir, o);
           }),
           py::arg("model_dir"), py::arg("dtype") = "auto", py::arg("device") = "cpu", py::arg("max_batch") = 16,
           py::arg("max_seq_len") = 2048, py::arg("max_prefill_tokens") = 4096, py::arg("quantization") = "",
           py::arg("backend") = "auto", py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("config", [](const moa::Engine& e) { return model_config_dict(e.config()); })
      .def_property_readonly("dtype",
                             [](const moa::Engine& e) { return std::string(c10::getDtypeNames(e.dtype()).first); })
      .def_property_readonly("weight_bytes", &moa::Engine::weight_bytes)
      .def_property_readonly("backend", &moa::Engine::backend_name)
      .def_property_readonly("device", [](const moa::Engine& e) { return e.options().device; })
      .def_property_readonly("max_batch", [](const moa::Engine& e) { return e.options().max_batch; })
      .def_property_readonly("max_seq_len", [](const moa::Engine& e) { return e.options().max_seq_len; });
}

// Experts, routers and MoA directories.
void bind_experts_and_routing(EngineClass& engine) {
  engine
      .def(
          "add_expert",
          [](moa::Engine& e, const std::string& name, const std::vector<py::tuple>& pieces) {
            std::vector<moa::LoraWeights> weights;
            for (const py::tuple& t : pieces) {
              if (t.size() != 5)
                throw py::value_error("add_expert: each piece is (layer, module, lora_a, lora_b, scale)");
              weights.push_back({t[0].cast<int64_t>(), t[1].cast<std::string>(), t[2].cast<at::Tensor>(),
                                 t[3].cast<at::Tensor>(), t[4].cast<float>()});
            }
            py::gil_scoped_release release;
            e.add_expert(name, weights);
          },
          py::arg("name"), py::arg("pieces"), "pieces: [(layer, module, lora_a [r, in], lora_b [out, r], scale)]")
      .def("remove_expert", &moa::Engine::remove_expert, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      // The getters that take the engine's lock release the GIL first: a step holds that lock
      // for its whole length, and other Python threads must run meanwhile.
      .def_property_readonly("experts",
                             py::cpp_function(&moa::Engine::experts, py::call_guard<py::gil_scoped_release>()))
      .def(
          "set_router",
          [](moa::Engine& e, const std::vector<std::string>& domains, const std::vector<at::Tensor>& weights,
             const std::string& strategy) {
            const moa::RoutingStrategy s = moa::parse_routing_strategy(strategy);
            py::gil_scoped_release release;
            e.set_router(domains, weights, s);
          },
          py::arg("domains"), py::arg("weights"), py::arg("strategy"))
      .def_property_readonly("router_domains",
                             py::cpp_function(&moa::Engine::router_domains, py::call_guard<py::gil_scoped_release>()))
      .def(
          "load_moa",
          [](moa::Engine& e, const std::string& moa_dir, const std::string& strategy) {
            const auto s = strategy_or_default(strategy);
            py::gil_scoped_release release;
            e.load_moa(moa_dir, s);
          },
          py::arg("moa_dir"), py::arg("strategy") = "",
          "Loads a MoA directory with the C++ reader: every domain's expert, and the routers (if any) "
          "with strategy ('' takes the directory's). All or nothing.")
      .def("load_expert", &moa::Engine::load_expert, py::arg("name"), py::arg("peft_dir"),
           py::call_guard<py::gil_scoped_release>(),
           "Loads a PEFT LoRA folder as the expert `name` with the C++ reader.");
}

// generate and the step-wise interface it runs on.
void bind_generation(EngineClass& engine) {
  engine
      .def(
          "generate",
          [](moa::Engine& e, const std::vector<moa::GenerationRequest>& requests, py::object on_token) {
            moa::Engine::TokenCallback cb;
            if (!on_token.is_none()) {
              cb = [on_token](size_t index, int64_t token) {
                py::gil_scoped_acquire gil;
                py::object keep = on_token(index, token);
                return keep.is_none() || keep.cast<bool>();
              };
            }
            py::gil_scoped_release release;
            return e.generate(requests, cb);
          },
          py::arg("requests"), py::arg("on_token") = py::none(),
          "Runs the requests to completion; on_token(index, token) -> False stops that request.")
      .def("submit", &moa::Engine::submit, py::arg("request"), py::call_guard<py::gil_scoped_release>())
      .def("step", &moa::Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("cancel", &moa::Engine::cancel, py::arg("request_id"), py::call_guard<py::gil_scoped_release>())
      .def("idle", &moa::Engine::idle, py::call_guard<py::gil_scoped_release>());
}

// The one-off passes: forward (scoring) and route.
void bind_scoring(EngineClass& engine) {
  engine
      .def(
          "forward",
          [](moa::Engine& e, const at::Tensor& input_ids, const std::vector<std::string>& domains) {
            py::gil_scoped_release release;
            return e.forward(input_ids, domains, nullptr);
          },
          py::arg("input_ids"), py::arg("domains") = std::vector<std::string>{},
          "input_ids [B, T] -> logits [B, T, vocab] float32; domains: one or one per row ('' routes).")
      .def(
          "forward_with_routing",
          [](moa::Engine& e, const at::Tensor& input_ids, const std::vector<std::string>& domains,
             const std::vector<int64_t>& route_lens, const std::string& strategy) {
            const auto s = strategy_or_default(strategy);
            std::vector<moa::RoutingInfo> routing;
            at::Tensor logits;
            {
              py::gil_scoped_release release;
              logits = e.forward(input_ids, domains, &routing, route_lens, s);
            }
            return py::make_tuple(logits, routing);
          },
          py::arg("input_ids"), py::arg("domains") = std::vector<std::string>{},
          py::arg("route_lens") = std::vector<int64_t>{}, py::arg("strategy") = "",
          "input_ids [B, T] -> (logits [B, T, vocab] float32, [RoutingInfo] per row); route_lens: "
          "route each row over its first n tokens (0: all); strategy: the routed rows' routing "
          "strategy ('' the engine's).")
      .def(
          "route",
          [](moa::Engine& e, const std::vector<std::vector<int64_t>>& prompts, const std::string& strategy) {
            const auto s = strategy_or_default(strategy);
            py::gil_scoped_release release;
            return e.route(prompts, s);
          },
          py::arg("prompts"), py::arg("strategy") = "",
          "[[token ids]] -> [RoutingInfo]: how each prompt would be routed, by a routing pass alone.");
}

// Internal (tests, benchmarks): the engine's dense linear.
void bind_internals(py::module_& m) {
  m.def(
      "_linear",
      [](const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
        TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.is_contiguous() &&
                              x.scalar_type() == w.scalar_type() && x.is_cpu() && w.is_cpu(),
                          "_linear: expected CPU x [M, K] and contiguous w [N, K] of one dtype");
        at::Tensor bias = b.has_value() ? b->contiguous() : at::Tensor();
        return moa::engine::linear(x, w, bias);
      },
      py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::call_guard<py::gil_scoped_release>(),
      "Internal (tests, benchmarks): the engine's dense linear, x [M, K] @ w [N, K]^T (+ b).");
  m.def(
      "_cpu_isa", []() { return std::string(moa::cpu::cpu_isa_name(moa::cpu::cpu_isa())); },
      "The level of the CPU decode kernels in use: 'avx512', 'avx2' or 'portable' (MOA_ENGINE_CPU_ISA).");
  m.def(
      "_bf16_isa", []() { return std::string(moa::cpu::bf16_isa_name(moa::cpu::bf16_isa())); },
      "How the decode kernels multiply bfloat16: 'avx512_bf16' (vdpbf16ps) or 'avx512' (widened to float).");
  m.def("_set_bf16_isa", &moa::cpu::set_bf16_isa, py::arg("name"),
        "Sets the bfloat16 decode kernels to 'avx512', 'avx512_bf16' or 'auto'; returns the choice now in use.");
}

}  // namespace

void bind_engine(py::module_& m) {
  register_exceptions();
  bind_request_types(m);
  EngineClass engine(m, "Engine",
                     "The C++ inference engine: an HF Llama-family folder, a KV cache of max_batch "
                     "slots, continuous batching. Token ids in, token ids out.");
  bind_loading(engine);
  bind_experts_and_routing(engine);
  bind_generation(engine);
  bind_scoring(engine);
  bind_internals(m);
}
