// CTest: the GGUF reader (engine/gguf.h) and config_from_gguf on the tiny GGUF model of
// test_files.h, and on every kind of broken file: each gives the right moa exception
// (FormatError, FileNotFound) with a message that names the file and the problem.
// Exit code 0 when every check passes.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "moa/errors.h"
#include "test_files.h"

namespace {

using moa::engine::GgufFile;
using moa::test::GgufWriter;
using moa::test::TempDir;

using moa::test::expect;
using moa::test::expect_error;

// Overwrites the header field `what` (GgufWriter::fields) with v (its width).
void patch(std::string& b, const GgufWriter& w, const std::string& what, uint64_t v) {
  for (const auto& f : w.fields()) {
    if (f.what == what) {
      std::memcpy(b.data() + f.offset, &v, static_cast<size_t>(f.width));
      return;
    }
  }
  throw std::runtime_error("patch: no field " + what);
}

template <typename T>
std::string raw(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

struct Files {
  TempDir tmp{"moa-gguf-test-"};
  int n = 0;
  // Writes the bytes to a fresh file; returns its path.
  std::string write(const std::string& bytes) {
    const std::string path = tmp / ("case" + std::to_string(n++) + ".gguf");
    moa::test::write_file(path, bytes);
    return path;
  }
};

void test_good(Files& files) {
  GgufWriter w = moa::test::tiny_gguf(3);
  const std::string bytes = w.bytes();
  const std::string path = files.write(bytes);
  GgufFile f = GgufFile::open(path);
  expect(f.version() == 3 && f.alignment() == 32, "tiny llama: version 3, alignment 32");
  expect(f.tensors().size() == 2 + 9 * moa::test::kGgufLayers + 1, "tiny llama: every tensor listed");
  expect(f.get_string("general.architecture") == "llama", "get_string");
  expect(f.get_int("llama.block_count") == 2 && f.get_float("llama.block_count") == 2.0, "get_int, get_float of a u32");
  expect(f.array_length("tokenizer.ggml.tokens") == 64 && f.get_string_array("tokenizer.ggml.tokens")[5] == "t5",
         "string array");
  expect(f.get_int_array("tokenizer.ggml.token_type") == std::vector<int64_t>(64, 1), "int array");
  expect_error<moa::FormatError>("get_int of a string", [&] { f.get_int("general.name"); },
                                 {path, "general.name", "integer", "string"});
  expect_error<moa::FormatError>("missing key", [&] { f.get_string("nope"); }, {path, "missing metadata 'nope'"});

  const moa::engine::GgufTensor* q = f.find("blk.1.attn_q.weight");
  expect(q != nullptr && q->type_id == 8 && q->ne == std::vector<int64_t>{32, 32} && q->nbytes == 32 * 34 &&
             q->offset % 32 == 0 && q->offset >= f.data_offset(),
         "find: Q8_0 tensor, ne GGUF order, nbytes, aligned absolute offset");
  const moa::engine::GgufTensor* e = f.find("token_embd.weight");
  expect(e != nullptr && std::memcmp(f.data(*e), bytes.data() + e->offset, e->nbytes) == 0 && e->nbytes == 32 * 64 * 2,
         "data(): the tensor's bytes");
  const at::Tensor v = f.view(*e);
  expect(v.dim() == 1 && v.numel() == static_cast<int64_t>(e->nbytes) && v.scalar_type() == at::kByte &&
             v.data_ptr() == f.data(*e),
         "view(): uint8 over the mapping");
  f.release(*e);
  expect(std::memcmp(f.data(*e), bytes.data() + e->offset, e->nbytes) == 0, "release(): pages read back");
  GgufFile moved = std::move(f);
  expect(moved.find("output.weight") != nullptr && moved.path() == path, "movable");

  const moa::ModelConfig c = moa::engine::config_from_gguf(moved);
  expect(c.model_type == "llama" && c.vocab_size == 64 && c.hidden_size == 32 && c.intermediate_size == 64 &&
             c.num_layers == 2 && c.num_heads == 4 && c.num_kv_heads == 2 && c.head_dim == 8 &&
             c.max_position_embeddings == 128 && !c.tie_word_embeddings && !c.attention_bias && c.bos_token_id == 1 &&
             c.eos_token_ids == std::vector<int64_t>{2, 3} && c.rope_theta == 10000.0 &&
             std::abs(c.rms_norm_eps - 1e-5) < 1e-9 && c.torch_dtype.empty(),
         "config_from_gguf: tiny llama");
  expect(moa::engine::gguf_permutes_qk("llama") && !moa::engine::gguf_permutes_qk("qwen2") &&
             !moa::engine::gguf_permutes_qk("mistral"),
         "gguf_permutes_qk");

  GgufWriter qw = moa::test::tiny_gguf(4, true);
  qw.remove_tensor("output.weight");
  const moa::ModelConfig qc = moa::engine::config_from_gguf(GgufFile::open(files.write(qw.bytes())));
  expect(qc.model_type == "qwen2" && qc.attention_bias && qc.tie_word_embeddings, "config_from_gguf: qwen2, tied");

  GgufWriter v2 = moa::test::tiny_gguf(5);
  v2.set_version(2);
  v2.remove_kv("general.alignment");  // default 32
  v2.remove_kv("llama.rope.dimension_count");
  expect(GgufFile::open(files.write(v2.bytes())).version() == 2, "version 2, default alignment");
}

void test_errors(Files& files) {
  const std::string missing = files.tmp / "missing.gguf";
  expect_error<moa::FileNotFound>("no such file", [&] { GgufFile::open(missing); }, {missing});

  GgufWriter w = moa::test::tiny_gguf(6);
  const std::string good = w.bytes();
  // Each case: a name, the file's bytes, the needles of the message.
  auto bad = [&](const std::string& what, const std::string& bytes, std::vector<std::string> needles,
                 bool config = false) {
    const std::string path = files.write(bytes);
    needles.insert(needles.begin(), path + ": ");
    expect_error<moa::FormatError>(
        what,
        [&] {
          GgufFile f = GgufFile::open(path);
          if (config) moa::engine::config_from_gguf(f);
        },
        needles);
  };
  auto patched = [&](const std::string& field, uint64_t v) {
    std::string b = good;
    patch(b, w, field, v);
    return b;
  };

  bad("empty file", "", {"shorter than the 24-byte header"});
  bad("short file", good.substr(0, 10), {"10 bytes", "shorter than the 24-byte header"});
  bad("bad magic", "GGUX" + good.substr(4), {"bad magic", "\"GGUX\""});
  bad("binary magic", std::string("\x01\x02\x03\x04", 4) + good.substr(4), {"bad magic", "\\x01\\x02"});
  bad("version 1", patched("version", 1), {"unsupported GGUF version 1"});
  bad("version 4", patched("version", 4), {"unsupported GGUF version 4"});
  bad("big-endian", patched("version", 0x03000000), {"big-endian"});
  bad("huge tensor count", patched("tensor count", uint64_t(1) << 60), {"cannot fit"});
  bad("huge kv count", patched("kv count", UINT64_MAX), {"cannot fit"});
  bad("kv count past the end", patched("kv count", 400), {"metadata key", "past the end"});
  bad("key length past the end", patched("kv general.name key length", 1 << 30), {"length 1073741824", "past the end"});
  bad("string value past the end", patched("kv general.name string length", good.size()),
      {"general.name", "past the end"});
  bad("unknown value type", patched("kv general.name type", 99), {"metadata 'general.name'", "unknown value type 99"});
  bad("unknown element type", patched("kv tokenizer.ggml.tokens element type", 13), {"unknown element type 13"});
  bad("huge array", patched("kv tokenizer.ggml.tokens array length", uint64_t(1) << 62),
      {"tokenizer.ggml.tokens", "claims"});
  bad("array past the end", patched("kv tokenizer.ggml.token_type array length", good.size() / 4),
      {"tokenizer.ggml.token_type", "claims"});
  bad("tensor name past the end", patched("tensor output.weight name length", UINT64_MAX), {"past the end"});
  bad("n_dims 0", patched("tensor blk.0.attn_q.weight n_dims", 0),
      {"tensor blk.0.attn_q.weight has 0 dimensions (expected 1 to 4)"});
  bad("n_dims 5", patched("tensor blk.0.attn_q.weight n_dims", 5), {"5 dimensions"});
  bad("dimension 0", patched("tensor blk.0.attn_v.weight ne1", 0), {"blk.0.attn_v.weight", "dimension 1 of 0"});
  bad("negative dimension", patched("tensor blk.0.attn_v.weight ne1", UINT64_MAX), {"dimension 1 of -1"});
  bad("unserved type", patched("tensor blk.0.attn_q.weight type", 10),
      {"tensor blk.0.attn_q.weight has type Q2_K (ggml type 10), which moa_engine does not serve (it serves F32, "
       "F16, BF16, Q8_0"});
  bad("unknown type", patched("tensor blk.0.attn_q.weight type", 1000), {"type 1000 (ggml type 1000)"});
  bad("row not a multiple of the block", patched("tensor blk.0.attn_q.weight ne0", 48),
      {"blk.0.attn_q.weight", "rows of 48 elements, not a multiple of its block size 32"});
  bad("unaligned offset", patched("tensor output.weight offset", 4),
      {"output.weight", "not a multiple of the alignment 32"});
  bad("offset past the end", patched("tensor output.weight offset", uint64_t(1) << 62),
      {"truncated file: tensor output.weight needs bytes [", std::to_string(good.size()) + " bytes"});
  bad("truncated data", good.substr(0, good.size() - 100),
      {"truncated file: tensor output.weight needs bytes [", "the file has " + std::to_string(good.size() - 100)});
  size_t n_dims_at = 0;
  for (const auto& f : w.fields())
    if (f.what == "tensor blk.0.attn_q.weight n_dims") n_dims_at = f.offset;
  bad("truncated header", good.substr(0, n_dims_at + 2),
      {"truncated file: tensor blk.0.attn_q.weight (its n_dims) needs 4 bytes"});

  auto variant = [&](const std::function<void(GgufWriter&)>& change) {
    GgufWriter v = moa::test::tiny_gguf(6);
    change(v);
    return v.bytes();
  };
  bad("overflowing shape",
      variant([](GgufWriter& v) { v.add_tensor("big", 0, {int64_t(1) << 32, int64_t(1) << 32}, std::string(4, 0)); }),
      {"tensor big", "overflows int64"});
  bad("duplicate tensor",
      variant([](GgufWriter& v) { v.add_tensor("output_norm.weight", 0, {8}, std::string(32, 0)); }),
      {"duplicate tensor name 'output_norm.weight'"});
  bad("duplicate key", variant([](GgufWriter& v) { v.add_string("general.name", "again"); }),
      {"duplicate metadata key 'general.name'"});
  bad("alignment not a power of two", variant([](GgufWriter& v) {
        v.remove_kv("general.alignment");
        v.add_u32("general.alignment", 24);
      }),
      {"general.alignment 24 is not a power of two"});
  bad("alignment 0", variant([](GgufWriter& v) {
        v.remove_kv("general.alignment");
        v.add_u32("general.alignment", 0);
      }),
      {"general.alignment 0 is not a power of two"});
  bad("alignment not a u32", variant([](GgufWriter& v) {
        v.remove_kv("general.alignment");
        v.add_u64("general.alignment", 32);
      }),
      {"'general.alignment' must be a u32, got a u64"});
  bad("bool not 0 or 1", variant([](GgufWriter& v) { v.add_raw("flag", 7, raw<uint8_t>(2)); }), {"'flag'", "bool"});
  // An array of one array of ... of one u32, 11 levels deep.
  std::string nested = raw<uint32_t>(4) + raw<uint64_t>(1) + raw<uint32_t>(7);
  for (int i = 0; i < 10; ++i) nested = raw<uint32_t>(9) + raw<uint64_t>(1) + nested;
  bad("arrays nested too deep", variant([&](GgufWriter& v) { v.add_raw("deep", 9, nested); }),
      {"'deep'", "nests arrays deeper than 8"});

  // config_from_gguf
  const bool cfg = true;
  bad("architecture gpt2", variant([](GgufWriter& v) {
        v.remove_kv("general.architecture");
        v.add_string("general.architecture", "gpt2");
      }),
      {"GGUF architecture 'gpt2' is not supported (supported: llama, mistral, qwen2)"}, cfg);
  bad("no architecture", variant([](GgufWriter& v) { v.remove_kv("general.architecture"); }),
      {"missing required metadata 'general.architecture'"}, cfg);
  for (const char* key :
       {"llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon", "llama.context_length"}) {
    bad(std::string("missing ") + key, variant([&](GgufWriter& v) { v.remove_kv(key); }),
        {std::string("missing required metadata '") + key + "'"}, cfg);
  }
  bad("0 layers", variant([](GgufWriter& v) {
        v.remove_kv("llama.block_count");
        v.add_u32("llama.block_count", 0);
      }),
      {"'llama.block_count' > 0, got 0"}, cfg);
  bad("kv heads not dividing heads", variant([](GgufWriter& v) {
        v.remove_kv("llama.attention.head_count_kv");
        v.add_u32("llama.attention.head_count_kv", 3);
      }),
      {"llama.attention.head_count (4) must be a multiple of llama.attention.head_count_kv (3)"}, cfg);
  bad("heads not dividing hidden", variant([](GgufWriter& v) {
        v.remove_kv("llama.rope.dimension_count");
        v.remove_kv("llama.attention.head_count");
        v.remove_kv("llama.attention.head_count_kv");
        v.add_u32("llama.attention.head_count", 3);
      }),
      {"llama.embedding_length (32) is not a multiple of llama.attention.head_count (3)"}, cfg);
  bad("odd head_dim", variant([](GgufWriter& v) {
        v.remove_kv("llama.rope.dimension_count");
        v.add_u32("llama.attention.key_length", 7);
      }),
      {"even head_dim > 0, got 7"}, cfg);
  bad("partial rotary", variant([](GgufWriter& v) { v.add_u32("llama.attention.key_length", 16); }),
      {"llama.rope.dimension_count (8) differs from the head_dim (16)"}, cfg);
  bad("head_count as a string", variant([](GgufWriter& v) {
        v.remove_kv("llama.attention.head_count");
        v.add_string("llama.attention.head_count", "4");
      }),
      {"'llama.attention.head_count' must be an integer, got a string"}, cfg);
  bad("yarn", variant([](GgufWriter& v) {
        v.add_string("llama.rope.scaling.type", "yarn");
        v.add_f32("llama.rope.scaling.factor", 4.0f);
      }),
      {"rope scaling 'yarn'", "not supported"}, cfg);
  bad("linear scaling", variant([](GgufWriter& v) { v.add_f32("llama.rope.scaling.factor", 2.0f); }),
      {"rope scaling 'linear'", "= 2"}, cfg);
  bad("rope_freqs", variant([](GgufWriter& v) { v.add_tensor("rope_freqs.weight", 0, {4}, std::string(16, 0)); }),
      {"rope_freqs.weight", "llama3 rope scaling from GGUF is not supported yet"}, cfg);
  bad("experts", variant([](GgufWriter& v) { v.add_u32("llama.expert_count", 8); }), {"mixture-of-experts"}, cfg);
  bad("mlp bias", variant([](GgufWriter& v) { v.add_tensor("blk.0.ffn_up.bias", 0, {64}, std::string(256, 0)); }),
      {"MLP biases"}, cfg);
  bad("layers differ", variant([](GgufWriter& v) {
        v.remove_kv("llama.attention.head_count_kv");
        v.add_raw("llama.attention.head_count_kv", 9,
                  raw<uint32_t>(4) + raw<uint64_t>(2) + raw<uint32_t>(2) + raw<uint32_t>(1));
      }),
      {"'llama.attention.head_count_kv' differs between layers"}, cfg);
  bad("no vocabulary", variant([](GgufWriter& v) {
        v.remove_kv("tokenizer.ggml.tokens");
        v.remove_tensor("token_embd.weight");
      }),
      {"no vocabulary size"}, cfg);

  // Fallbacks: per-layer arrays of one value, vocab from token_embd.
  GgufWriter ok = moa::test::tiny_gguf(7);
  ok.remove_kv("llama.attention.head_count_kv");
  ok.add_raw("llama.attention.head_count_kv", 9,
             raw<uint32_t>(4) + raw<uint64_t>(2) + raw<uint32_t>(2) + raw<uint32_t>(2));
  ok.remove_kv("tokenizer.ggml.tokens");
  ok.remove_kv("tokenizer.ggml.eot_token_id");
  ok.remove_kv("tokenizer.ggml.bos_token_id");
  const moa::ModelConfig c = moa::engine::config_from_gguf(GgufFile::open(files.write(ok.bytes())));
  expect(
      c.num_kv_heads == 2 && c.vocab_size == 64 && c.bos_token_id == -1 && c.eos_token_ids == std::vector<int64_t>{2},
      "per-layer head_count_kv, vocab from token_embd, no bos / eot");
}

}  // namespace

int main() {
  Files files;
  test_good(files);
  test_errors(files);
  return moa::test::summary();
}
