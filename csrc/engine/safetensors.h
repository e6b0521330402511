// A reader for safetensors checkpoints, single-file or sharded with an index.
// Files are memory-mapped; tensors are read-only views of the mapping. After a tensor
// has been copied into the engine's own buffers, release() returns its pages to the OS,
// so loading holds at most the weights plus one tensor in memory.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {...}}, then the data; offsets are relative to the data start.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moa::engine {

struct TensorRecord {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the file's mapping
  int64_t nbytes = 0;
  size_t file = 0;  // which of the checkpoint's files
};

class MappedFile;

class Checkpoint {
 public:
  // Opens model_dir/model.safetensors, or the shards named by
  // model_dir/model.safetensors.index.json. Throws FileNotFound or FormatError.
  static Checkpoint open(const std::string& model_dir);
  // Opens one safetensors file (tests, tools).
  static Checkpoint open_file(const std::string& path);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorRecord& record(const std::string& name) const;  // FormatError if absent
  // A CPU tensor viewing the mapped bytes; valid while this Checkpoint lives. Read only.
  at::Tensor view(const std::string& name) const;
  // Drops the mapped pages of a tensor already copied (they would be read back from
  // the file if touched again).
  void release(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& file_of(const std::string& name) const;

 private:
  Checkpoint();
  void add_file(const std::string& path);
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorRecord> tensors_;
};

}  // namespace moa::engine
