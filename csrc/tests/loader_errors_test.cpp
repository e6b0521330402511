// CTest: moa::Engine on broken inputs. A truncated or garbled safetensors file, a bad
// config.json, a missing or mis-shaped tensor, and every kind of bad MoA-directory file
// give the right moa exception (FormatError, FileNotFound, InvalidArgument) with a message
// that names the file and the problem, never a crash; a failed load_moa leaves the engine
// as it was. Inputs: the tiny random model and MoA directory of test_files.h.
// Exit code 0 when every check passes.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "moa/engine.h"
#include "test_files.h"

namespace {

namespace fs = std::filesystem;
using moa::test::TempDir;
using nlohmann::ordered_json;

using moa::test::expect;
using moa::test::expect_error;

void edit_json(const std::string& path, const std::function<void(ordered_json&)>& change) {
  ordered_json j = ordered_json::parse(moa::test::read_file(path));
  change(j);
  moa::test::write_file(path, j.dump());
}

std::string variant(const TempDir& tmp, const std::string& good, const std::string& name) {
  const std::string dir = tmp / name;
  moa::test::copy_tree(good, dir);
  return dir;
}

uint64_t header_length(const std::string& bytes) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return n;
}

moa::test::NamedTensors without(moa::test::NamedTensors t, const std::string& name) {
  std::erase_if(t, [&](const auto& p) { return p.first == name; });
  return t;
}

moa::test::NamedTensors replaced(moa::test::NamedTensors t, const std::string& name, const at::Tensor& value) {
  for (auto& p : t)
    if (p.first == name) p.second = value;
  return t;
}

moa::EngineOptions small() {
  moa::EngineOptions o;
  o.max_batch = 4;
  o.max_seq_len = 64;
  return o;
}

void model_folder_errors(const TempDir& tmp, const std::string& good) {
  using moa::FileNotFound;
  using moa::FormatError;
  auto open = [](const std::string& dir) { return [dir] { moa::Engine e(dir, small()); }; };
  expect_error<FileNotFound>("missing model folder", open(tmp / "absent"), {"absent", "no such model folder"});

  std::string dir = variant(tmp, good, "no_config");
  fs::remove(dir + "/config.json");
  expect_error<FileNotFound>("missing config.json", open(dir), {dir + "/config.json", "missing"});

  struct ConfigCase {
    const char* name;
    std::function<void(const std::string&)> corrupt;
    std::vector<std::string> needles;
  };
  const std::string cfg = "/config.json";
  const std::vector<ConfigCase> configs = {
      {"config.json not JSON",
       [](auto p) { moa::test::write_file(p, "{\"model_type\": \"llama\","); },
       {"not valid JSON"}},
      {"config.json not an object", [](auto p) { moa::test::write_file(p, "[1, 2]"); }, {"expected a JSON object"}},
      {"config.json missing field",
       [](auto p) { edit_json(p, [](auto& j) { j.erase("hidden_size"); }); },
       {"missing required field 'hidden_size'"}},
      {"config.json wrong type",
       [](auto p) { edit_json(p, [](auto& j) { j["hidden_size"] = "16"; }); },
       {"field 'hidden_size' has the wrong type"}},
      {"config.json float size",
       [](auto p) { edit_json(p, [](auto& j) { j["num_hidden_layers"] = 2.5; }); },
       {"'num_hidden_layers' has the wrong type"}},
      {"config.json negative size",
       [](auto p) { edit_json(p, [](auto& j) { j["vocab_size"] = -3; }); },
       {"expected 'vocab_size' > 0"}},
      {"config.json unsupported model",
       [](auto p) { edit_json(p, [](auto& j) { j["model_type"] = "gpt2"; }); },
       {"model_type 'gpt2' is not supported"}},
      {"config.json heads",
       [](auto p) { edit_json(p, [](auto& j) { j["num_key_value_heads"] = 3; }); },
       {"must be a multiple of num_key_value_heads"}},
  };
  for (const auto& c : configs) {
    dir = variant(tmp, good, std::string("cfg_") + std::to_string(&c - configs.data()));
    c.corrupt(dir + cfg);
    auto needles = c.needles;
    needles.push_back(dir + cfg);
    expect_error<FormatError>(c.name, open(dir), needles);
  }
  // A config.json that disagrees with the checkpoint: the tensor is named.
  dir = variant(tmp, good, "more_layers");
  edit_json(dir + cfg, [](auto& j) { j["num_hidden_layers"] = 3; });
  expect_error<FormatError>("config.json with more layers than the checkpoint", open(dir),
                            {"missing tensor 'model.layers.2.input_layernorm.weight'"});
  dir = variant(tmp, good, "wider");
  edit_json(dir + cfg, [](auto& j) { j["intermediate_size"] = 32; });
  expect_error<FormatError>(
      "config.json wider than the checkpoint", open(dir),
      {"model.safetensors", "'model.layers.0.mlp.gate_proj.weight' has shape [24, 16], expected [32, 16]"});

  // The safetensors file: truncated at every kind of boundary, garbled, lying lengths.
  const std::string weights = moa::test::read_file(good + "/model.safetensors");
  const uint64_t hlen = header_length(weights);
  const std::vector<size_t> cuts = {
      0, 5, 8, 9, 8 + hlen / 2, 8 + hlen - 1, 8 + hlen, weights.size() / 2, weights.size() - 1};
  for (size_t cut : cuts) {
    dir = variant(tmp, good, "cut_" + std::to_string(cut));
    moa::test::write_file(dir + "/model.safetensors", weights.substr(0, cut));
    expect_error<FormatError>("model.safetensors truncated to " + std::to_string(cut) + " bytes", open(dir),
                              {dir + "/model.safetensors"});
  }
  struct ByteCase {
    const char* name;
    std::function<void(std::string&)> corrupt;
    std::string needle;
  };
  const std::vector<ByteCase> bytes = {
      {"header length 2^63", [](std::string& b) { b[7] = '\x80'; }, "corrupt safetensors header length"},
      {"header length 0", [](std::string& b) { std::memset(b.data(), 0, 8); }, "corrupt safetensors header"},
      {"garbled header", [hlen](std::string& b) { std::memcpy(b.data() + 8 + hlen / 2, "\xff\xfe}{", 4); },
       "corrupt safetensors header"},
      {"header not an object",
       [hlen](std::string& b) { b.replace(8, hlen, std::string(hlen, ' ')).replace(8, 2, "[]"); }, "not a JSON object"},
  };
  for (const auto& c : bytes) {
    std::string b = weights;
    c.corrupt(b);
    dir = variant(tmp, good, std::string("bytes_") + std::to_string(&c - bytes.data()));
    moa::test::write_file(dir + "/model.safetensors", b);
    expect_error<FormatError>(std::string("model.safetensors ") + c.name, open(dir),
                              {dir + "/model.safetensors", c.needle});
  }
  const auto tensors = moa::test::tiny_model_tensors(1);
  struct TensorCase {
    const char* name;
    moa::test::NamedTensors tensors;
    std::string needle;
  };
  const std::vector<TensorCase> tensor_cases = {
      {"missing tensor", without(tensors, "model.layers.1.mlp.down_proj.weight"),
       "missing tensor 'model.layers.1.mlp.down_proj.weight'"},
      {"wrong shape", replaced(tensors, "model.layers.0.self_attn.q_proj.weight", at::zeros({16, 15})),
       "'model.layers.0.self_attn.q_proj.weight' has shape [16, 15], expected [16, 16]"},
      {"integer tensor", replaced(tensors, "lm_head.weight", at::zeros({64, 16}, at::kInt)),
       "'lm_head.weight' is not floating point"},
  };
  for (const auto& c : tensor_cases) {
    dir = variant(tmp, good, std::string("tensors_") + std::to_string(&c - tensor_cases.data()));
    moa::test::write_file(dir + "/model.safetensors", moa::test::safetensors_bytes(c.tensors));
    expect_error<FormatError>(c.name, open(dir), {dir, c.needle});
  }
  dir = variant(tmp, good, "no_weights");
  fs::remove(dir + "/model.safetensors");
  expect_error<FileNotFound>("missing model.safetensors", open(dir), {"no model.safetensors"});
}

// The strategies' names: each parses to its value and back; anything else is an
// InvalidArgument (or, for a name read from a file, a FormatError) naming it and the valid names.
void routing_strategy_names() {
  for (const moa::RoutingStrategy s :
       {moa::RoutingStrategy::kPerLayer, moa::RoutingStrategy::kLast, moa::RoutingStrategy::kVote})
    expect(moa::parse_routing_strategy(moa::to_string(s)) == s,
           std::string("strategy name round trip: ") + moa::to_string(s));
  expect(std::string(moa::to_string(moa::RoutingStrategy::kPerLayer)) == "per_layer", "kPerLayer is named per_layer");
  for (const char* bad : {"top2", "", "Last", "vote "})
    expect_error<moa::InvalidArgument>(
        std::string("bad strategy name '") + bad + "'", [&] { moa::parse_routing_strategy(bad); },
        {std::string("routing strategy '") + bad + "' is not one of per_layer, last, vote"});
  expect_error<moa::FormatError>(
      "bad strategy name in a file",
      [] { moa::parse_routing_strategy<moa::FormatError>("best", "field 'router.strategy':"); },
      {"field 'router.strategy': 'best' is not one of per_layer, last, vote"});
}

void moa_dir_errors(const TempDir& tmp, const std::string& model, const std::string& good) {
  using moa::FileNotFound;
  using moa::FormatError;
  using moa::InvalidArgument;
  moa::Engine engine(model, small());
  auto load = [&](const std::string& dir, std::optional<moa::RoutingStrategy> strategy = std::nullopt) {
    return [&engine, dir, strategy] { engine.load_moa(dir, strategy); };
  };
  auto unchanged = [&](const std::string& what) {
    expect(engine.experts().empty() && engine.router_domains().empty(), what + ": engine unchanged");
  };
  expect_error<FileNotFound>("missing MoA directory", load(tmp / "absent_moa"),
                             {"absent_moa", "no such MoA directory"});
  routing_strategy_names();

  struct Case {
    const char* name;
    const char* file;  // the file the message must name, relative to the directory
    std::function<void(const std::string&)> corrupt;
    std::string needle;
    bool not_found = false;
  };
  const char* A = "experts/a/adapter_config.json";
  const char* W = "experts/a/adapter_model.safetensors";
  const char* R = "router.safetensors";
  auto json_case = [](const char* file, std::function<void(ordered_json&)> f) {
    return [file, f](const std::string& d) { edit_json(d + "/" + file, f); };
  };
  auto tensors_case = [](const char* file, std::function<moa::test::NamedTensors(moa::test::NamedTensors)> f) {
    return [file, f](const std::string& d) {
      // Re-read the file's tensors through a fresh copy of the test's writer inputs.
      moa::test::NamedTensors t;
      const std::string bytes = moa::test::read_file(d + "/" + file);
      const uint64_t n = header_length(bytes);
      const auto header = ordered_json::parse(bytes.substr(8, n));
      for (const auto& [name, e] : header.items()) {
        if (name == "__metadata__") continue;
        const auto off = e["data_offsets"];
        const std::vector<int64_t> shape = e["shape"].get<std::vector<int64_t>>();
        at::Tensor x = at::empty(shape, at::kFloat);
        std::memcpy(x.data_ptr(), bytes.data() + 8 + n + off[0].get<size_t>(), x.nbytes());
        t.emplace_back(name, x);
      }
      moa::test::write_file(d + "/" + file, moa::test::safetensors_bytes(f(t)));
    };
  };
  const std::string qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  const std::string kb = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight";
  const std::vector<Case> cases = {
      {"moa_config.json not JSON", "moa_config.json",
       [](auto d) { moa::test::write_file(d + "/moa_config.json", "{"); }, "not valid JSON"},
      {"moa_config.json missing", "moa_config.json", [](auto d) { fs::remove(d + "/moa_config.json"); }, "no such file",
       true},
      {"moa_config.json unknown field", "moa_config.json",
       json_case("moa_config.json", [](auto& j) { j["extra"] = 1; }), "unknown field(s) ['extra']"},
      {"moa_config.json missing field", "moa_config.json",
       json_case("moa_config.json", [](auto& j) { j.erase("eta"); }), "missing field(s) ['eta']"},
      {"moa_config.json bad strategy", "moa_config.json",
       json_case("moa_config.json", [](auto& j) { j["router"]["strategy"] = "top2"; }),
       "field 'router.strategy': 'top2' is not one of per_layer, last, vote"},
      {"moa_config.json domains differ by case", "moa_config.json",
       json_case("moa_config.json", [](auto& j) { j["domains"] = {"a", "A"}; }), "duplicates 'a'"},
      {"moa_config.json newer format", "moa_config.json",
       json_case("moa_config.json", [](auto& j) { j["format_version"] = 2; }), "newer than this moa_engine supports"},
      {"moa_config.json domain without folder", "experts/c/adapter_config.json",
       json_case("moa_config.json", [](auto& j) { j["domains"] = {"a", "c"}; }), "missing (domain 'c'", true},
      {"adapter DoRA", A, json_case(A, [](auto& j) { j["use_dora"] = true; }), "DoRA (use_dora) is not supported"},
      {"adapter bias", A, json_case(A, [](auto& j) { j["bias"] = "lora_only"; }), "bias is not supported"},
      {"adapter modules_to_save", A, json_case(A, [](auto& j) { j["modules_to_save"] = {"lm_head"}; }),
       "modules_to_save is not supported"},
      {"adapter peft_type", A, json_case(A, [](auto& j) { j["peft_type"] = "IA3"; }), "only 'LORA' adapters"},
      {"adapter r not a number", A, json_case(A, [](auto& j) { j["r"] = "2"; }), "r is missing or not a number"},
      {"adapter unsupported module", A, json_case(A, [](auto& j) { j["target_modules"].push_back("lm_head"); }),
       "targets modules the engine does not support: ['lm_head']"},
      {"adapter Python-only regex", A, json_case(A, [](auto& j) { j["rank_pattern"] = {{"(?P<m>q_proj)", 1}}; }),
       "is not a regex this reader supports"},
      {"adapter rank_pattern mismatch", W, json_case(A, [](auto& j) { j["rank_pattern"] = {{"q_proj", 4}}; }),
       "gives rank 4 (r / rank_pattern)"},
      {"adapter config targets fewer modules", W, json_case(A, [](auto& j) { j["target_modules"] = {"q_proj"}; }),
       "which adapter_config.json does not target"},
      {"adapter weights missing", W, [W](auto d) { fs::remove(d + "/" + W); }, "missing (domain 'a'", true},
      {"adapter weights truncated", W,
       [W](auto d) {
         const std::string b = moa::test::read_file(d + "/" + W);
         moa::test::write_file(d + "/" + W, b.substr(0, b.size() - 7));
       },
       "truncated file?"},
      {"adapter weights lora_B missing", W, tensors_case(W, [kb](auto t) { return without(t, kb); }),
       "model.layers.1.self_attn.k_proj has lora_A but no lora_B"},
      {"adapter weights rank mismatch", W,
       tensors_case(W, [qa](auto t) { return replaced(t, qa, at::zeros({3, 16})); }), "has rank 3 but lora_B"},
      {"adapter for another base", "experts/a",
       tensors_case(W,
                    [](auto t) {
                      for (auto& [name, x] : t)
                        if (name.find("k_proj.lora_B") != std::string::npos) x = at::zeros({16, 2});
                      return t;
                    }),
       "adapter made for another base: model.layers.0.self_attn.k_proj expects lora_A [2, 16] and lora_B [8, 2]"},
      {"adapter unknown tensor", W,
       tensors_case(W,
                    [](auto t) {
                      t.emplace_back("base_model.model.lm_head.weight", at::zeros({2, 2}));
                      return t;
                    }),
       "unexpected tensor(s) ['base_model.model.lm_head.weight']"},
      {"router wrong domain count", R,
       tensors_case(R,
                    [](auto t) {
                      for (auto& p : t) p.second = at::zeros({3, 16});
                      return t;
                    }),
       "router has 3 outputs but the MoA dir has 2 domains"},
      {"router missing layer", R, tensors_case(R, [](auto t) { return without(t, "layers.0.weight"); }),
       "lacks layers.0.weight"},
      {"router extra layer", R,
       tensors_case(R,
                    [](auto t) {
                      t.emplace_back("layers.2.weight", at::zeros({2, 16}));
                      return t;
                    }),
       "router has 3 layers but the model has 2"},
      {"router other hidden size", "",
       tensors_case(R,
                    [](auto t) {
                      for (auto& p : t) p.second = at::zeros({2, 12});
                      return t;
                    }),
       "experts and router disagree on the hidden size"},
      {"router garbled", R,
       [R](auto d) {
         std::string b = moa::test::read_file(d + "/" + R);
         b[12] = '\x01';
         moa::test::write_file(d + "/" + R, b);
       },
       "corrupt safetensors header"},
  };
  for (const auto& c : cases) {
    const std::string dir = variant(tmp, good, std::string("moa_") + std::to_string(&c - cases.data()));
    c.corrupt(dir);
    const std::vector<std::string> needles = {*c.file ? dir + "/" + c.file : dir, c.needle};
    if (c.not_found) {
      expect_error<FileNotFound>(c.name, load(dir), needles);
    } else {
      expect_error<FormatError>(c.name, load(dir), needles);
    }
    unchanged(c.name);
  }

  // A strategy with no routers to apply it to.
  std::string dir = variant(tmp, good, "moa_no_router");
  fs::remove(dir + "/router.safetensors");
  expect_error<InvalidArgument>("routing without router.safetensors", load(dir, moa::RoutingStrategy::kVote),
                                {"routing 'vote' was given", "has no router.safetensors"});
  unchanged("routing without router.safetensors");

  // The good directory loads, and a second load of the same names is refused whole.
  engine.load_moa(good);
  expect(engine.experts() == std::vector<std::string>{"a", "b"}, "good directory: experts a, b");
  expect(engine.router_domains() == std::vector<std::string>{"a", "b"}, "good directory: router over a, b");
  expect_error<InvalidArgument>("loading the same directory twice", load(good), {"'a' is already loaded"});
  expect(engine.experts().size() == 2, "a refused second load leaves two experts");
  expect_error<InvalidArgument>("unknown domain in a request",
                                [&] {
                                  moa::GenerationRequest r;
                                  r.prompt = {3, 4};
                                  r.max_new_tokens = 4;
                                  r.domain = "c";
                                  engine.generate({r});
                                },
                                {"unknown domain 'c' (known: base, a, b)"});
  expect_error<moa::FileNotFound>("load_expert from a missing folder",
                                  [&] { engine.load_expert("c", tmp / "absent_expert"); },
                                  {"no such PEFT adapter folder"});

  // The experts are live: each changes the logits, and routed requests report per-layer choices.
  const at::Tensor ids = at::arange(3, 11, at::kLong).view({1, 8});
  const at::Tensor base = engine.forward(ids, {moa::kBaseDomain}, nullptr);
  for (const char* d : {"a", "b"}) {
    const double diff = (engine.forward(ids, {d}, nullptr) - base).abs().max().item<double>();
    expect(diff > 1e-3, std::string("expert ") + d + " changes the logits (max diff " + std::to_string(diff) + ")");
  }
  moa::GenerationRequest routed;
  routed.prompt = {5, 6, 7, 8};
  routed.max_new_tokens = 4;
  routed.ignore_eos = true;
  const auto out = engine.generate({routed});
  expect(out[0].token_ids.size() == 4 && out[0].routing.router_probs.size() == 2 &&
             (out[0].routing.domain == "a" || out[0].routing.domain == "b"),
         "a routed request is served by a routed expert: " + out[0].routing.domain);

  // route(): the routing pass alone gives the choices and probabilities generate() reports,
  // for each strategy, and forward() takes the strategy per call.
  for (const moa::RoutingStrategy strategy :
       {moa::RoutingStrategy::kPerLayer, moa::RoutingStrategy::kLast, moa::RoutingStrategy::kVote}) {
    moa::GenerationRequest r = routed;
    r.routing = strategy;
    const auto served = engine.generate({r});
    const auto alone = engine.route({routed.prompt, {9, 3}}, strategy);
    expect(alone.size() == 2 && alone[0].layer_domains == served[0].routing.layer_domains &&
               alone[0].router_probs == served[0].routing.router_probs,
           std::string("route(") + moa::to_string(strategy) + ") gives generate()'s routing");
    std::vector<moa::RoutingInfo> info;
    const at::Tensor prompt = at::tensor(routed.prompt, at::kLong).view({1, -1});
    engine.forward(prompt, {moa::kRoutedDomain}, &info, {}, strategy);
    expect(info.size() == 1 && info[0].layer_domains == served[0].routing.layer_domains,
           std::string("forward(strategy ") + moa::to_string(strategy) + ") routes as generate()");
  }
  expect_error<InvalidArgument>("route an empty prompt", [&] { engine.route({{3, 4}, {}}); }, {"prompt 1 is empty"});
  expect_error<InvalidArgument>("route an out-of-vocabulary id", [&] { engine.route({{3, 100000}}); },
                                {"token id 100000 is not in [0, "});
}

}  // namespace

int main() {
  try {
    TempDir tmp("moa-loader-errors-");
    const std::string model = tmp / "model";
    const std::string moa_dir = tmp / "moa";
    moa::test::write_tiny_model(model, 1);
    moa::test::write_tiny_moa_dir(moa_dir, 2);
    {
      moa::Engine engine(model, small());  // the good folder works
      moa::GenerationRequest r;
      r.prompt = {3, 4, 5};
      r.max_new_tokens = 5;
      r.ignore_eos = true;
      expect(engine.generate({r})[0].token_ids.size() == 5, "the tiny model generates");
    }
    model_folder_errors(tmp, model);
    moa_dir_errors(tmp, model, moa_dir);
  } catch (const std::exception& e) {
    std::printf("FAIL unexpected exception: %s\n", e.what());
    return 1;
  }
  return moa::test::summary();
}
