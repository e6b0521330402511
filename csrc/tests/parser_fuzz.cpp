// CTest, built with -fsanitize=address,undefined: the readers of untrusted files
// (safetensors, config.json, moa_config.json, adapter_config.json, router.safetensors) on
// a few hundred corrupted inputs. Each case copies a good tiny model folder and MoA
// directory (test_files.h), corrupts one file in one way, and runs the reader over it:
// the reader must either succeed or throw a moa::Error; any other exception fails the
// case, and a memory error or undefined behaviour aborts under the sanitizers.
// Then --gguf-cases more cases corrupt the tiny GGUF model (test_files.h) and run the GGUF
// reader (engine/gguf.h) and config_from_gguf over it, reading every metadata value and
// every tensor's bytes.
//
// Corruptions: bit flips, truncations, byte splices, lying header-length fields, edits of
// the JSON (config files and safetensors headers, rewritten with a consistent length):
// a value replaced by one of another type or an awkward one (negative, huge, empty, long,
// a Python-only regex, deep nesting), a key removed or added; a file removed or replaced
// by a folder. The seed is fixed; --case K reruns one case.
//
//   moa_parser_fuzz [--cases N] [--gguf-cases G] [--seed S] [--case K] [--verbose]
// (--case K reruns safetensors/JSON case K; GGUF case K is --case gguf:K.)
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/gguf.h"
#include "engine/moa_dir.h"
#include "engine/safetensors.h"
#include "engine/weights.h"
#include "moa/errors.h"
#include "test_files.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;
using Rng = std::mt19937_64;

// The files a case may corrupt, and which reader runs over it.
struct Target {
  const char* name;
  const char* path;  // relative to the case folder
  bool safetensors;
  bool model;  // read with read_model_config + load_weights, else read_moa_dir
};
const std::vector<Target>& targets() {
  static const std::vector<Target> t = {
      {"config.json", "model/config.json", false, true},
      {"model.safetensors", "model/model.safetensors", true, true},
      {"moa_config.json", "moa/moa_config.json", false, false},
      {"adapter_config.json (a)", "moa/experts/a/adapter_config.json", false, false},
      {"adapter_config.json (b)", "moa/experts/b/adapter_config.json", false, false},
      {"adapter_model.safetensors (a)", "moa/experts/a/adapter_model.safetensors", true, false},
      {"adapter_model.safetensors (b)", "moa/experts/b/adapter_model.safetensors", true, false},
      {"router.safetensors", "moa/router.safetensors", true, false},
  };
  return t;
}

int64_t pick(Rng& rng, int64_t n) { return std::uniform_int_distribution<int64_t>(0, n - 1)(rng); }

template <typename T>
const T& pick(Rng& rng, const std::vector<T>& items) {
  return items[pick(rng, static_cast<int64_t>(items.size()))];
}

// A JSON value chosen to break a reader: wrong types, limits, awkward strings.
ordered_json awkward_value(Rng& rng) {
  switch (pick(rng, 12)) {
    case 0: return nullptr;
    case 1: return pick(rng, 2) == 1;
    case 2: return pick(rng, std::vector<int64_t>{0, -1, 1, 2, 3, 7, 16, 64, 1 << 20, INT64_MAX, INT64_MIN});
    case 3: return pick(rng, std::vector<uint64_t>{UINT64_MAX, uint64_t(1) << 63, uint64_t(1) << 40});
    case 4: return pick(rng, std::vector<double>{0.5, -0.0, 1e308, -2.5, 3.0, 1e-300});
    case 5:
      return pick(rng, std::vector<std::string>{"", "x", "F32", "I8", "BF16", "q_proj", "LORA", "none", "layers",
                                                "llama", "last", "../x", "base"});
    case 6:
      return pick(rng, std::vector<std::string>{"(?P<m>q_proj)", "((((", "a{99999}", "[", "(a|b)*c", ".*", "\\d+",
                                                "(?i)Q_PROJ"});
    case 7: return std::string(static_cast<size_t>(1 + pick(rng, 3000)), 'a' + static_cast<char>(pick(rng, 26)));
    case 8: return ordered_json::array();
    case 9: return ordered_json::object();
    case 10: {
      ordered_json v = ordered_json::array();
      for (int64_t i = pick(rng, 4); i > 0; --i) v.push_back(pick(rng, std::vector<int64_t>{0, 1, 2, 3, -1, 16, 24}));
      return v;
    }
    default: {
      ordered_json v = 1;  // nesting: readers must not recurse without bound
      for (int64_t depth = 1 + pick(rng, 200); depth > 0; --depth) v = ordered_json::array({v});
      return v;
    }
  }
}

// Every value's JSON pointer (the root excluded).
void collect(const ordered_json& j, const ordered_json::json_pointer& at,
             std::vector<ordered_json::json_pointer>& out) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) {
      out.push_back(at / k);
      collect(v, at / k, out);
    }
  } else if (j.is_array()) {
    for (size_t i = 0; i < j.size(); ++i) {
      out.push_back(at / i);
      collect(j[i], at / i, out);
    }
  }
}

// One structural edit of a JSON document; `what` describes it.
void edit_json(ordered_json& j, Rng& rng, std::string& what) {
  std::vector<ordered_json::json_pointer> ptrs;
  collect(j, ordered_json::json_pointer(), ptrs);
  const int64_t kind = ptrs.empty() ? 2 : pick(rng, 5);
  if (kind <= 1) {  // replace a value
    const auto& p = pick(rng, ptrs);
    ordered_json v = awkward_value(rng);
    what = "set " + p.to_string() + " to a " + std::string(v.type_name());
    j[p] = std::move(v);
  } else if (kind == 2) {  // add a key to an object (the root, or a nested one)
    std::vector<ordered_json::json_pointer> objects = {ordered_json::json_pointer()};
    for (const auto& p : ptrs)
      if (j[p].is_object()) objects.push_back(p);
    const auto& p = pick(rng, objects);
    const std::string key =
        pick(rng, std::vector<std::string>{"extra", "use_dora", "bias", "modules_to_save", "layers_to_transform",
                                           "layers_pattern", "exclude_modules", "__metadata__", "rank_pattern",
                                           "rope_scaling", "head_dim"});
    what = "add " + p.to_string() + "/" + key;
    if (j[p].is_object()) j[p][key] = awkward_value(rng);
  } else if (kind == 3) {  // remove a value
    const auto& p = pick(rng, ptrs);
    what = "remove " + p.to_string();
    ordered_json& parent = j[p.parent_pointer()];
    if (parent.is_object())
      parent.erase(p.back());
    else if (parent.is_array())
      parent.erase(static_cast<size_t>(std::stoul(p.back())));
  } else {  // swap two values
    const auto& p = pick(rng, ptrs);
    const auto& q = pick(rng, ptrs);
    what = "copy " + q.to_string() + " to " + p.to_string();
    if (!p.to_string().starts_with(q.to_string())) j[p] = ordered_json(j[q]);
  }
}

uint64_t header_length(const std::string& b) {
  uint64_t n = 0;
  if (b.size() >= 8) std::memcpy(&n, b.data(), 8);
  return n;
}

// One byte-level corruption.
void corrupt_bytes(std::string& b, Rng& rng, std::string& what) {
  switch (pick(rng, 3)) {
    case 0: {
      const int64_t flips = 1 + pick(rng, 8);
      for (int64_t i = 0; i < flips && !b.empty(); ++i) b[pick(rng, b.size())] ^= static_cast<char>(1 << pick(rng, 8));
      what = "flip " + std::to_string(flips) + " bits";
      break;
    }
    case 1: {
      const size_t n = b.empty() ? 0 : static_cast<size_t>(pick(rng, b.size()));
      b.resize(n);
      what = "truncate to " + std::to_string(n) + " bytes";
      break;
    }
    default: {
      const size_t at = b.empty() ? 0 : static_cast<size_t>(pick(rng, b.size()));
      const std::string junk = pick(rng, std::vector<std::string>{"\xff\xfe", "}", "{", "\"", ",", "[1e999]", "\\u0000",
                                                                  std::string(1, '\0'), "\xc3"});
      if (pick(rng, 2))
        b.insert(at, junk);
      else
        b.replace(at, std::min(junk.size(), b.size() - at), junk);
      what = "splice bytes at " + std::to_string(at);
    }
  }
}

// A safetensors-specific corruption: the length field, or an edit of the header JSON
// rewritten with a consistent length (so the reader gets past the length check).
void corrupt_safetensors(std::string& b, Rng& rng, std::string& what) {
  const uint64_t n = header_length(b);
  if (pick(rng, 2) == 0) {
    const uint64_t size = b.size();
    const uint64_t v =
        pick(rng, std::vector<uint64_t>{0, 1, 2, n - 1, n + 1, size - 8, size - 7, size, uint64_t(1) << 32,
                                        uint64_t(1) << 63, UINT64_MAX, static_cast<uint64_t>(pick(rng, size))});
    std::memcpy(b.data(), &v, 8);
    what = "header length " + std::to_string(n) + " -> " + std::to_string(v);
    return;
  }
  ordered_json header = ordered_json::parse(b.substr(8, n));
  edit_json(header, rng, what);
  what = "header: " + what;
  const std::string text = header.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
  const uint64_t m = text.size();
  b = std::string(reinterpret_cast<const char*>(&m), 8) + text + b.substr(8 + n);
}

void corrupt_file(const std::string& path, const Target& t, Rng& rng, std::string& what) {
  const int64_t kind = pick(rng, 10);
  if (kind == 0) {
    if (pick(rng, 2)) {
      fs::remove(path);
      what = "remove the file";
    } else {
      fs::remove(path);
      fs::create_directories(path);
      what = "replace the file by a folder";
    }
    return;
  }
  std::string b = moa::test::read_file(path);
  if (kind <= 4) {
    corrupt_bytes(b, rng, what);
  } else if (t.safetensors) {
    corrupt_safetensors(b, rng, what);
  } else {
    ordered_json j = ordered_json::parse(b);
    edit_json(j, rng, what);
    b = j.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
  }
  moa::test::write_file(path, b);
}

// Runs the reader of the target's folder. Returns "" on success, else the error's kind.
std::string run_reader(const std::string& dir, const Target& t, const moa::ModelConfig& good_config) {
  if (t.model) {
    const moa::ModelConfig config = moa::engine::read_model_config(dir + "/model");
    moa::engine::load_weights(dir + "/model", config, at::kFloat, at::Device("cpu"));
    return "";
  }
  moa::engine::read_moa_dir(dir + "/moa", nullptr);       // the format alone
  moa::engine::read_moa_dir(dir + "/moa", &good_config);  // and against the model
  return "";
}

// A GGUF corruption: a byte-level one, or a header field (GgufWriter::fields: a count, a
// length, a type, a dimension, an offset, a value) set to an awkward number.
void corrupt_gguf(std::string& b, const moa::test::GgufWriter& w, Rng& rng, std::string& what) {
  if (pick(rng, 3) == 0) {
    corrupt_bytes(b, rng, what);
    return;
  }
  const auto& f = pick(rng, w.fields());
  uint64_t old = 0;
  std::memcpy(&old, b.data() + f.offset, static_cast<size_t>(f.width));
  const uint64_t size = b.size();
  uint64_t v = pick(rng, std::vector<uint64_t>{0,
                                               1,
                                               2,
                                               3,
                                               4,
                                               5,
                                               7,
                                               8,
                                               9,
                                               10,
                                               12,
                                               13,
                                               30,
                                               31,
                                               33,
                                               48,
                                               255,
                                               old - 1,
                                               old + 1,
                                               old * 2,
                                               size,
                                               size - f.offset,
                                               uint64_t(1) << 31,
                                               (uint64_t(1) << 32) - 1,
                                               uint64_t(1) << 32,
                                               uint64_t(1) << 62,
                                               uint64_t(1) << 63,
                                               UINT64_MAX,
                                               static_cast<uint64_t>(pick(rng, size))});
  if (f.width == 4) v &= 0xffffffffu;
  std::memcpy(b.data() + f.offset, &v, static_cast<size_t>(f.width));
  what = f.what + " " + std::to_string(old) + " -> " + std::to_string(v);
}

// Opens the file and reads everything the engine would: the config, every metadata value,
// every tensor's bytes.
void run_gguf_reader(const std::string& path) {
  const moa::engine::GgufFile f = moa::engine::GgufFile::open(path);
  for (const auto& key : f.keys()) {
    const moa::engine::GgufValue* v = f.find_value(key);
    if (v->type() == moa::engine::GgufType::ARRAY) {
      const auto elem = f.array_type(key);
      if (elem == moa::engine::GgufType::STRING)
        f.get_string_array(key);
      else if (elem != moa::engine::GgufType::ARRAY)
        f.get_float_array(key);
    }
  }
  uint64_t sum = 0;
  for (const auto& t : f.tensors()) {
    const uint8_t* p = f.data(t);
    for (uint64_t i = 0; i < t.nbytes; i += 61) sum += p[i];
    sum += p[t.nbytes - 1];
    f.release(t);
  }
  volatile uint64_t sink = sum;
  (void)sink;
  moa::engine::config_from_gguf(f);
}

struct Args {
  int64_t cases = 400;
  int64_t gguf_cases = 150;
  int64_t only_gguf = -1;
  uint64_t seed = 1;
  int64_t only = -1;
  bool verbose = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const bool has_value = i + 1 < argc;
    if (flag == "--cases" && has_value)
      a.cases = std::stoll(argv[++i]);
    else if (flag == "--gguf-cases" && has_value)
      a.gguf_cases = std::stoll(argv[++i]);
    else if (flag == "--case" && has_value && std::string(argv[i + 1]).starts_with("gguf:"))
      a.only_gguf = std::stoll(std::string(argv[++i]).substr(5)), a.cases = 0;
    else if (flag == "--seed" && has_value)
      a.seed = std::stoull(argv[++i]);
    else if (flag == "--case" && has_value)
      a.only = std::stoll(argv[++i]);
    else if (flag == "--verbose")
      a.verbose = true;
    else
      throw std::invalid_argument(
          "usage: moa_parser_fuzz [--cases N] [--gguf-cases G] [--seed S] [--case K | --case gguf:K] [--verbose]");
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  moa::test::TempDir tmp("moa-parser-fuzz-");
  const std::string pristine = tmp / "pristine";
  moa::test::write_tiny_model(pristine + "/model", 7);
  moa::test::write_tiny_moa_dir(pristine + "/moa", 8);
  // The uncorrupted inputs read cleanly, so an error below comes from the corruption.
  const moa::ModelConfig config = moa::engine::read_model_config(pristine + "/model");
  if (!run_reader(pristine, targets()[0], config).empty() || !run_reader(pristine, targets()[2], config).empty()) {
    std::printf("FAIL the uncorrupted files do not read\n");
    return 1;
  }
  std::map<std::string, int64_t> outcomes;  // "target: ok | FormatError | ..." -> count
  int64_t failures = 0, errors = 0;
  for (int64_t k = 0; k < args.cases; ++k) {
    if (args.only >= 0 && k != args.only) continue;
    Rng rng(args.seed * 1000003 + static_cast<uint64_t>(k));
    const Target& t = pick(rng, targets());
    const std::string dir = tmp / ("case" + std::to_string(k));
    moa::test::copy_tree(pristine, dir);
    std::string what;
    corrupt_file(dir + "/" + t.path, t, rng, what);
    std::string outcome;
    std::string message;
    try {
      run_reader(dir, t, config);
      outcome = "ok";
    } catch (const moa::FileNotFound& e) {
      outcome = "FileNotFound", message = e.what();
    } catch (const moa::FormatError& e) {
      outcome = "FormatError", message = e.what();
    } catch (const moa::InvalidArgument& e) {
      outcome = "InvalidArgument", message = e.what();
    } catch (const moa::Error& e) {
      outcome = "Error", message = e.what();
    } catch (const std::exception& e) {
      outcome = "FOREIGN", message = e.what();
      ++failures;
    }
    if (outcome != "ok") ++errors;
    ++outcomes[std::string(t.name) + ": " + outcome];
    if (args.verbose || outcome == "FOREIGN")
      std::printf("%s case %lld %s, %s -> %s %s\n", outcome == "FOREIGN" ? "FAIL" : "    ", static_cast<long long>(k),
                  t.name, what.c_str(), outcome.c_str(), message.substr(0, 300).c_str());
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  // GGUF: the tiny model's bytes, corrupted in memory, written to one file per case.
  moa::test::GgufWriter gguf = moa::test::tiny_gguf(9, false);
  const std::string gguf_good = gguf.bytes();
  const std::string gguf_path = tmp / "case.gguf";
  moa::test::write_file(gguf_path, gguf_good);
  run_gguf_reader(gguf_path);  // the uncorrupted file reads
  int64_t gguf_ran = 0;
  for (int64_t k = 0; k < (args.only_gguf >= 0 ? args.only_gguf + 1 : args.only >= 0 ? 0 : args.gguf_cases); ++k) {
    if (args.only_gguf >= 0 && k != args.only_gguf) continue;
    ++gguf_ran;
    Rng rng(args.seed * 1000033 + 77 + static_cast<uint64_t>(k));
    std::string b = gguf_good;
    std::string what;
    corrupt_gguf(b, gguf, rng, what);
    moa::test::write_file(gguf_path, b);
    std::string outcome, message;
    try {
      run_gguf_reader(gguf_path);
      outcome = "ok";
    } catch (const moa::FileNotFound& e) {
      outcome = "FileNotFound", message = e.what();
    } catch (const moa::FormatError& e) {
      outcome = "FormatError", message = e.what();
    } catch (const moa::Error& e) {
      outcome = "Error", message = e.what();
    } catch (const std::exception& e) {
      outcome = "FOREIGN", message = e.what();
      ++failures;
    }
    if (outcome != "ok") ++errors;
    ++outcomes["model.gguf: " + outcome];
    if (args.verbose || outcome == "FOREIGN")
      std::printf("%s gguf case %lld, %s -> %s %s\n", outcome == "FOREIGN" ? "FAIL" : "    ", static_cast<long long>(k),
                  what.c_str(), outcome.c_str(), message.substr(0, 300).c_str());
  }
  for (const auto& [key, n] : outcomes) std::printf("%6lld  %s\n", static_cast<long long>(n), key.c_str());
  const int64_t ran = (args.only >= 0 ? 1 : args.cases) + gguf_ran;
  std::printf("%lld cases: %lld refused with a moa exception, %lld read, %lld failed\n", static_cast<long long>(ran),
              static_cast<long long>(errors), static_cast<long long>(ran - errors - failures),
              static_cast<long long>(failures));
  // A run where (nearly) nothing is refused would mean the corruptions miss the readers.
  if (args.only < 0 && args.only_gguf < 0 && errors < ran / 2) {
    std::printf("FAIL only %lld of %lld corruptions were refused\n", static_cast<long long>(errors),
                static_cast<long long>(ran));
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
