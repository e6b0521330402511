// moa_generate: generation with moa_core from C++, no Python. Token ids in, token ids out;
// pair it with a tokenizer to work in text (README.md, "Embedding in C++").
//
//   moa_generate --model DIR [--moa MOA_DIR] [--domain NAME] [--routing STRATEGY]
//                [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//                [--ignore-eos] [--dtype D] [--max-batch B] [--verbose]
//                (--ids "1 2 3" | --file F) [--stream]
//
// --file F holds one prompt per line (ids separated by spaces or commas; blank lines are
// skipped; "-" reads stdin). Several prompts are generated as one batch.
// Output: one line of generated ids per prompt, in input order. With --stream, a line
// "<prompt index> <token id>" as each token is generated instead.
// Exit status: 0 done; 1 the engine refused (model, MoA directory or prompt); 2 bad usage.
#include <moa/engine.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char* kUsage =
    "usage: moa_generate --model DIR [--moa MOA_DIR] [--domain NAME] [--routing per_layer|last|vote]\n"
    "                    [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "                    [--ignore-eos] [--dtype auto|float32|bfloat16] [--max-batch B] [--verbose]\n"
    "                    (--ids \"1 2 3\" | --file F) [--stream]\n";

// A bad command line: reported with the usage, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string model, moa, domain, routing, ids, file;
  bool has_ids = false, stream = false, verbose = false;
  moa::EngineOptions options;
  int64_t max_new_tokens = 64;
  bool ignore_eos = false;
  moa::SamplingParams sampling;
};

int64_t to_int(const std::string& text, const std::string& what) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    throw UsageError(what + ": expected an integer, got '" + text + "'");
  return v;
}

uint64_t to_uint(const std::string& text, const std::string& what) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    throw UsageError(what + ": expected a non-negative integer, got '" + text + "'");
  return v;
}

float to_float(const std::string& text, const std::string& what) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || errno == ERANGE)
    throw UsageError(what + ": expected a number, got '" + text + "'");
  return static_cast<float>(v);
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--model")
      a.model = value();
    else if (flag == "--moa")
      a.moa = value();
    else if (flag == "--domain")
      a.domain = value();
    else if (flag == "--routing")
      a.routing = value();
    else if (flag == "--ids") {
      a.ids = value();
      a.has_ids = true;
    } else if (flag == "--file")
      a.file = value();
    else if (flag == "--max-new-tokens")
      a.max_new_tokens = to_int(value(), flag);
    else if (flag == "--temperature")
      a.sampling.temperature = to_float(value(), flag);
    else if (flag == "--top-k")
      a.sampling.top_k = to_int(value(), flag);
    else if (flag == "--top-p")
      a.sampling.top_p = to_float(value(), flag);
    else if (flag == "--seed")
      a.sampling.seed = to_uint(value(), flag);
    else if (flag == "--dtype")
      a.options.dtype = value();
    else if (flag == "--max-batch")
      a.options.max_batch = to_int(value(), flag);
    else if (flag == "--ignore-eos")
      a.ignore_eos = true;
    else if (flag == "--stream")
      a.stream = true;
    else if (flag == "--verbose")
      a.verbose = true;
    else if (flag == "-h" || flag == "--help")
      throw UsageError("");
    else
      throw UsageError("unknown option '" + flag + "'");
  }
  if (a.model.empty()) throw UsageError("--model is required");
  if (a.has_ids == !a.file.empty()) throw UsageError("give the prompt ids with exactly one of --ids and --file");
  if (!a.routing.empty() && a.moa.empty())
    throw UsageError("--routing needs --moa (routers come with a MoA directory)");
  return a;
}

// "1 2 3" or "1,2,3" -> ids; `where` names the source in errors.
std::vector<int64_t> parse_ids(const std::string& line, const std::string& where) {
  std::string text = line;
  for (char& c : text)
    if (c == ',' || c == '\t' || c == '\r') c = ' ';
  std::istringstream in(text);
  std::vector<int64_t> ids;
  for (std::string word; in >> word;) ids.push_back(to_int(word, where));
  return ids;
}

std::vector<std::vector<int64_t>> read_prompts(const Args& a) {
  if (a.has_ids) {
    auto ids = parse_ids(a.ids, "--ids");
    if (ids.empty()) throw UsageError("--ids is empty");
    return {ids};
  }
  std::ifstream file;
  if (a.file != "-") {
    file.open(a.file);
    if (!file) throw UsageError("--file: cannot open '" + a.file + "'");
  }
  std::istream& in = a.file == "-" ? std::cin : file;
  std::vector<std::vector<int64_t>> prompts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    auto ids = parse_ids(line, a.file + ":" + std::to_string(n));
    if (!ids.empty()) prompts.push_back(std::move(ids));
  }
  if (prompts.empty()) throw UsageError("--file: '" + a.file + "' holds no prompt");
  return prompts;
}

std::vector<moa::GenerationRequest> make_requests(const Args& a, const std::vector<std::vector<int64_t>>& prompts) {
  std::vector<moa::GenerationRequest> requests;
  for (const auto& ids : prompts) {
    moa::GenerationRequest r;
    r.prompt = ids;
    r.max_new_tokens = a.max_new_tokens;
    r.sampling = a.sampling;
    r.ignore_eos = a.ignore_eos;
    r.domain = a.domain;  // default moa::kRoutedDomain: the routers choose (the base model, with no experts)
    requests.push_back(std::move(r));
  }
  return requests;
}

void print_ids(const std::vector<int64_t>& ids) {
  for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(ids[i]));
  std::printf("\n");
}

int run(const Args& a) {
  const auto prompts = read_prompts(a);
  moa::EngineOptions options = a.options;
  // Room for the longest prompt and its generation.
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  options.max_seq_len = std::max<int64_t>(2, static_cast<int64_t>(longest) + std::max<int64_t>(a.max_new_tokens, 0));

  moa::Engine engine(a.model, options);
  if (!a.moa.empty()) {
    std::optional<moa::RoutingStrategy> routing;  // none: the directory's own strategy
    if (!a.routing.empty()) routing = moa::parse_routing_strategy(a.routing, "--routing");
    engine.load_moa(a.moa, routing);
  }

  moa::Engine::TokenCallback on_token;
  if (a.stream) {
    on_token = [](size_t index, int64_t token) {
      std::printf("%zu %lld\n", index, static_cast<long long>(token));
      std::fflush(stdout);
      return true;
    };
  }
  const auto results = engine.generate(make_requests(a, prompts), on_token);
  for (size_t i = 0; i < results.size(); ++i) {
    if (!a.stream) print_ids(results[i].token_ids);
    if (a.verbose)
      std::fprintf(stderr, "prompt %zu: %zu tokens, finish %s, domain %s\n", i, results[i].token_ids.size(),
                   moa::to_string(results[i].finish_reason), results[i].routing.domain.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    if (*e.what()) std::fprintf(stderr, "moa_generate: %s\n", e.what());
    std::fputs(kUsage, stderr);
    return *e.what() ? 2 : 0;
  } catch (const moa::Error& e) {  // InvalidArgument, FormatError, FileNotFound
    std::fprintf(stderr, "moa_generate: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moa_generate: unexpected error: %s\n", e.what());
    return 1;
  }
}
