// safetensors reader (see safetensors.h). Every size and offset in the header is
// checked against the file before a byte of data is touched, so a truncated or
// garbled file gives a FormatError naming it, never a crash.
#include "engine/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>

#include "moa/errors.h"

namespace moa::engine {

using nlohmann::json;

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw_error<FileNotFound>(path, ": cannot open (", std::strerror(errno), ")");
    struct stat st{};
    if (::fstat(fd_, &st) != 0) {
      ::close(fd_);
      throw_error<FormatError>(path, ": cannot stat (", std::strerror(errno), ")");
    }
    size_ = static_cast<int64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE, fd_, 0);
      if (p == MAP_FAILED) {
        ::close(fd_);
        throw_error<FormatError>(path, ": cannot memory-map (", std::strerror(errno), ")");
      }
      data_ = static_cast<const uint8_t*>(p);
    }
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  void release(const uint8_t* begin, int64_t nbytes) const {
    if (nbytes <= 0) return;
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    uintptr_t lo = reinterpret_cast<uintptr_t>(begin) & ~(page - 1);
    uintptr_t hi = (reinterpret_cast<uintptr_t>(begin) + nbytes + page - 1) & ~(page - 1);
    ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advisory: errors ignored
  }

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

namespace {

// safetensors dtype name -> (ATen dtype, element size); unsupported names -> nullopt.
std::optional<std::pair<at::ScalarType, int64_t>> parse_dtype(const std::string& name) {
  static const std::map<std::string, std::pair<at::ScalarType, int64_t>> table = {
      {"F64", {at::kDouble, 8}}, {"F32", {at::kFloat, 4}}, {"F16", {at::kHalf, 2}},  {"BF16", {at::kBFloat16, 2}},
      {"I64", {at::kLong, 8}},   {"I32", {at::kInt, 4}},   {"I16", {at::kShort, 2}}, {"I8", {at::kChar, 1}},
      {"U8", {at::kByte, 1}},    {"BOOL", {at::kBool, 1}},
  };
  auto it = table.find(name);
  if (it == table.end()) return std::nullopt;
  return it->second;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error<FileNotFound>(path, ": cannot open the file");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The JSON header of a safetensors file: its length (8 bytes, little-endian) checked
// against the file, then the JSON object itself.
json read_header(const MappedFile& file, uint64_t& header_len) {
  const std::string& path = file.path();
  const int64_t size = file.size();
  if (size < 8)
    throw_error<FormatError>(path, ": not a safetensors file (", size,
                             " bytes, shorter than its 8-byte header length)");
  std::memcpy(&header_len, file.data(), 8);  // little-endian on every supported host
  if (header_len > static_cast<uint64_t>(size - 8) || header_len > (uint64_t(100) << 20)) {
    throw_error<FormatError>(path, ": corrupt safetensors header length ", header_len, " (file has ", size, " bytes)");
  }
  const char* hbegin = reinterpret_cast<const char*>(file.data() + 8);
  json header;
  try {
    header = json::parse(hbegin, hbegin + header_len);
  } catch (const json::exception& e) {
    throw_error<FormatError>(path, ": corrupt safetensors header (", e.what(), ")");
  }
  if (!header.is_object()) throw_error<FormatError>(path, ": corrupt safetensors header (not a JSON object)");
  return header;
}

// Throws the FormatError of a corrupt header entry, naming the file and the tensor.
struct BadEntry {
  const std::string& path;
  const std::string& name;
  [[noreturn]] void operator()(const std::string& why) const {
    throw_error<FormatError>(path, ": corrupt entry for tensor '", name, "': ", why);
  }
};

// The entry's shape into `shape`; returns its element count (checked not to overflow).
int64_t read_shape(const json& js, const BadEntry& bad, std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (const auto& d : js) {
    if (!d.is_number_unsigned()) bad("shape holds a value that is not a non-negative integer");
    const uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (v != 0 && numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(v)))
      bad("shape is too large");
    shape.push_back(static_cast<int64_t>(v));
    numel *= static_cast<int64_t>(v);
  }
  return numel;
}

// One header entry {"dtype", "shape", "data_offsets"} -> its record (all but `file`), its
// bytes checked to lie within the data section [data, data + data_size).
TensorRecord read_entry(const json& entry, const uint8_t* data, int64_t data_size, const BadEntry& bad) {
  if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
    bad("expected an object with dtype, shape and data_offsets");
  const auto& jd = entry["dtype"];
  const auto& js = entry["shape"];
  const auto& jo = entry["data_offsets"];
  if (!jd.is_string()) bad("dtype is not a string");
  if (!js.is_array()) bad("shape is not a list");
  if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
    bad("data_offsets is not a pair of non-negative integers");
  const auto dtype = parse_dtype(jd.get<std::string>());
  if (!dtype) bad("unsupported dtype " + jd.get<std::string>());
  TensorRecord rec;
  rec.dtype = dtype->first;
  const int64_t numel = read_shape(js, bad, rec.shape);
  const uint64_t begin = jo[0].get<uint64_t>();
  const uint64_t end = jo[1].get<uint64_t>();
  if (begin > end || end > static_cast<uint64_t>(data_size)) {
    bad(detail::concat("data_offsets [", begin, ", ", end, ") fall outside the ", data_size,
                       " data bytes (truncated file?)"));
  }
  if (numel > std::numeric_limits<int64_t>::max() / dtype->second) bad("shape is too large");
  rec.nbytes = static_cast<int64_t>(end - begin);
  if (rec.nbytes != numel * dtype->second) {
    bad(detail::concat("its shape and dtype need ", numel * dtype->second, " bytes, data_offsets give ", rec.nbytes));
  }
  rec.data = data + begin;
  return rec;
}

}  // namespace

Checkpoint::Checkpoint() = default;
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

void Checkpoint::add_file(const std::string& path) {
  auto file = std::make_unique<MappedFile>(path);
  uint64_t header_len = 0;
  const json header = read_header(*file, header_len);
  const uint8_t* data = file->data() + 8 + header_len;
  const int64_t data_size = file->size() - 8 - static_cast<int64_t>(header_len);
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    TensorRecord rec = read_entry(entry, data, data_size, BadEntry{path, name});
    rec.file = files_.size();
    if (!tensors_.emplace(name, std::move(rec)).second)
      throw_error<FormatError>(path, ": tensor '", name, "' appears in more than one file");
  }
  files_.push_back(std::move(file));
}

Checkpoint Checkpoint::open_file(const std::string& path) {
  Checkpoint c;
  c.add_file(path);
  return c;
}

Checkpoint Checkpoint::open(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  Checkpoint c;
  if (fs::exists(index)) {
    json j;
    try {
      j = json::parse(read_text(index.string()));
    } catch (const json::exception& e) {
      throw_error<FormatError>(index.string(), ": not valid JSON (", e.what(), ")");
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw_error<FormatError>(index.string(), ": expected an object with a 'weight_map' object");
    std::set<std::string> shards;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw_error<FormatError>(index.string(), ": weight_map['", name, "'] is not a file name");
      const std::string f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f == "..")
        throw_error<FormatError>(index.string(), ": weight_map['", name, "'] names a file outside the folder: ", f);
      shards.insert(f);
    }
    for (const auto& f : shards) {
      if (!fs::exists(dir / f))
        throw_error<FileNotFound>((dir / f).string(), ": shard named by ", index.string(), " is missing");
      c.add_file((dir / f).string());
    }
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!c.contains(name))
        throw_error<FormatError>(index.string(), ": tensor '", name, "' is not in its shard ", file.get<std::string>());
    }
  } else if (fs::exists(single)) {
    c.add_file(single.string());
  } else {
    throw_error<FileNotFound>(model_dir, ": no model.safetensors or model.safetensors.index.json");
  }
  return c;
}

const TensorRecord& Checkpoint::record(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw_error<FormatError>("checkpoint: missing tensor '", name, "'");
  return it->second;
}

at::Tensor Checkpoint::view(const std::string& name) const {
  const TensorRecord& r = record(name);
  // from_blob over read-only memory: callers only read (copy out) from it.
  return at::from_blob(const_cast<uint8_t*>(r.data), r.shape, at::TensorOptions().dtype(r.dtype));
}

void Checkpoint::release(const std::string& name) const {
  const TensorRecord& r = record(name);
  files_[r.file]->release(r.data, r.nbytes);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, rec] : tensors_) out.push_back(name);
  return out;
}

const std::string& Checkpoint::file_of(const std::string& name) const { return files_[record(name).file]->path(); }

}  // namespace moa::engine
