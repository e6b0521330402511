// GGUF reader (see gguf.h). The header is read through a Cursor that checks every read
// against the end of the file; counts and lengths from the file are checked against the
// bytes left before anything is allocated from them.
#include "engine/gguf.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "kernels/cpu/quant_types.h"
#include "moa/errors.h"

namespace moa::engine {

// A read-only private mapping of the whole file (empty files are not mapped).
struct GgufFile::Mapping {
  std::string path;
  int fd = -1;
  const uint8_t* data = nullptr;
  uint64_t size = 0;

  explicit Mapping(const std::string& p) : path(p) {
    fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error<FileNotFound>(p, ": cannot open (", std::strerror(errno), ")");
    struct stat st{};
    if (::fstat(fd, &st) != 0) fail("cannot stat (", std::strerror(errno), ")");
    if (!S_ISREG(st.st_mode)) fail("not a regular file");
    size = static_cast<uint64_t>(st.st_size);
    if (size > 0) {
      void* m = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) fail("cannot memory-map (", std::strerror(errno), ")");
      data = static_cast<const uint8_t*>(m);
    }
  }
  ~Mapping() {
    if (data != nullptr) ::munmap(const_cast<uint8_t*>(data), static_cast<size_t>(size));
    if (fd >= 0) ::close(fd);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  template <typename... Args>
  [[noreturn]] void fail(Args&&... args) {
    ::close(fd);
    fd = -1;
    throw_error<FormatError>(path, ": ", std::forward<Args>(args)...);
  }
};

std::string gguf_type_name(uint32_t type) {
  static const char* const kNames[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                       "bool", "string", "array", "u64", "i64", "f64"};
  if (type < sizeof(kNames) / sizeof(kNames[0])) return kNames[type];
  return "type " + std::to_string(type);
}

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxArrayDepth = 8;

// Bytes of one element of a fixed-size type; 0 for string and array.
uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::BOOL: return 1;
    case GgufType::U16:
    case GgufType::I16: return 2;
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::F32: return 4;
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::F64: return 8;
    case GgufType::STRING:
    case GgufType::ARRAY: return 0;
  }
  return 0;
}

// The fewest bytes an element of a type takes (a string: its length; an array: its type
// and length): bounds how many elements the rest of the file can hold.
uint64_t min_size(GgufType t) {
  if (t == GgufType::STRING) return 8;
  if (t == GgufType::ARRAY) return 12;
  return scalar_size(t);
}

// Whether s is well-formed UTF-8 (keys and tensor names must be: they become Python str).
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

bool known_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::F64); }

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // little-endian on every supported host
  return v;
}

// Sequential reads of the header, each checked against the end of the file.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* data, uint64_t size) : path_(path), data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  const uint8_t* here() const { return data_ + pos_; }

  // Throws unless n more bytes are there; `what` names what is being read.
  void need(uint64_t n, const std::string& what) const {
    if (n > left()) {
      throw_error<FormatError>(path_, ": truncated file: ", what, " needs ", n, " bytes at offset ", pos_,
                               ", the file has ", size_, " bytes");
    }
  }
  void skip(uint64_t n, const std::string& what) {
    need(n, what);
    pos_ += n;
  }
  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v = load<T>(data_ + pos_);
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& what) {
    const uint64_t n = read<uint64_t>(what + " (its length)");
    if (n > left()) {
      throw_error<FormatError>(path_, ": ", what, " has length ", n, " at offset ", pos_ - 8,
                               ", past the end of the file (", size_, " bytes)");
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    pos_ += n;
    return s;
  }
  // Checks a string and steps over it, without copying it.
  void skip_string(const std::string& what) {
    const uint64_t n = read<uint64_t>(what + " (its length)");
    if (n > left()) {
      throw_error<FormatError>(path_, ": ", what, " has length ", n, " at offset ", pos_ - 8,
                               ", past the end of the file (", size_, " bytes)");
    }
    pos_ += n;
  }

 private:
  const std::string& path_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Reads an array's element type and length and steps over its elements (checking every
// string and nested array); the cursor ends after the array.
GgufArray read_array(Cursor& c, const std::string& path, const std::string& what, int depth) {
  if (depth > kMaxArrayDepth)
    throw_error<FormatError>(path, ": ", what, " nests arrays deeper than ", kMaxArrayDepth, " levels");
  GgufArray a;
  const uint32_t t = c.read<uint32_t>(what + " (its element type)");
  if (!known_type(t)) throw_error<FormatError>(path, ": ", what, " has an unknown element type ", t);
  a.elem_type = static_cast<GgufType>(t);
  a.length = c.read<uint64_t>(what + " (its length)");
  const uint64_t min = min_size(a.elem_type);
  if (a.length > c.left() / min) {
    throw_error<FormatError>(path, ": ", what, " claims ", a.length, " elements of type ", gguf_type_name(t),
                             ", more than the ", c.left(), " bytes left in the file can hold");
  }
  const uint64_t begin = c.pos();
  a.data = c.here();
  if (a.elem_type == GgufType::STRING) {
    for (uint64_t i = 0; i < a.length; ++i) c.skip_string(what + " element " + std::to_string(i));
  } else if (a.elem_type == GgufType::ARRAY) {
    for (uint64_t i = 0; i < a.length; ++i) read_array(c, path, what + " element " + std::to_string(i), depth + 1);
  } else {
    c.skip(a.length * min, what);
  }
  a.nbytes = c.pos() - begin;
  return a;
}

GgufValue read_value(Cursor& c, const std::string& path, const std::string& key) {
  const std::string what = "metadata '" + key + "'";
  const uint32_t t = c.read<uint32_t>(what + " (its value type)");
  if (!known_type(t)) throw_error<FormatError>(path, ": ", what, " has an unknown value type ", t);
  GgufValue v;
  switch (static_cast<GgufType>(t)) {
    case GgufType::U8: v.value.emplace<0>(c.read<uint8_t>(what)); break;
    case GgufType::I8: v.value.emplace<1>(c.read<int8_t>(what)); break;
    case GgufType::U16: v.value.emplace<2>(c.read<uint16_t>(what)); break;
    case GgufType::I16: v.value.emplace<3>(c.read<int16_t>(what)); break;
    case GgufType::U32: v.value.emplace<4>(c.read<uint32_t>(what)); break;
    case GgufType::I32: v.value.emplace<5>(c.read<int32_t>(what)); break;
    case GgufType::F32: v.value.emplace<6>(c.read<float>(what)); break;
    case GgufType::BOOL: {
      const uint8_t b = c.read<uint8_t>(what);
      if (b > 1) throw_error<FormatError>(path, ": ", what, " is a bool holding ", int(b), " (not 0 or 1)");
      v.value.emplace<7>(b == 1);
      break;
    }
    case GgufType::STRING: v.value.emplace<8>(c.read_string(what)); break;
    case GgufType::ARRAY: v.value.emplace<9>(read_array(c, path, what, 1)); break;
    case GgufType::U64: v.value.emplace<10>(c.read<uint64_t>(what)); break;
    case GgufType::I64: v.value.emplace<11>(c.read<int64_t>(what)); break;
    case GgufType::F64: v.value.emplace<12>(c.read<double>(what)); break;
  }
  return v;
}

// An integer of any kind as int64, if it is an integer and fits.
std::optional<int64_t> as_int(const GgufValue& v, bool& out_of_range) {
  out_of_range = false;
  return std::visit(
      [&](const auto& x) -> std::optional<int64_t> {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool> || !std::is_integral_v<T>) {
          return std::nullopt;
        } else if constexpr (std::is_same_v<T, uint64_t>) {
          if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
            out_of_range = true;
            return std::nullopt;
          }
          return static_cast<int64_t>(x);
        } else {
          return static_cast<int64_t>(x);
        }
      },
      v.value);
}

// Element i of a flat array of scalars, as int64 / double.
int64_t int_element(const GgufArray& a, uint64_t i, bool& ok) {
  const uint8_t* p = a.data + i * scalar_size(a.elem_type);
  ok = true;
  switch (a.elem_type) {
    case GgufType::U8: return load<uint8_t>(p);
    case GgufType::I8: return load<int8_t>(p);
    case GgufType::BOOL: return load<uint8_t>(p) != 0;
    case GgufType::U16: return load<uint16_t>(p);
    case GgufType::I16: return load<int16_t>(p);
    case GgufType::U32: return load<uint32_t>(p);
    case GgufType::I32: return load<int32_t>(p);
    case GgufType::I64: return load<int64_t>(p);
    case GgufType::U64: {
      const uint64_t u = load<uint64_t>(p);
      ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      return ok ? static_cast<int64_t>(u) : 0;
    }
    default: ok = false; return 0;
  }
}

}  // namespace

GgufFile::GgufFile() = default;
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

const std::string& GgufFile::path() const { return map_->path; }
uint64_t GgufFile::file_size() const { return map_->size; }

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.map_ = std::make_unique<Mapping>(path);
  f.parse();
  return f;
}

void GgufFile::parse() {
  const std::string& path = map_->path;
  const uint64_t size = map_->size;
  if (size < 24) {
    throw_error<FormatError>(path, ": not a GGUF file (", size,
                             " bytes, shorter than the 24-byte header: magic, version, tensor and metadata counts)");
  }
  Cursor c(path, map_->data, size);
  const uint32_t magic = c.read<uint32_t>("the magic");
  if (magic != kMagic) {
    std::string shown;
    for (int i = 0; i < 4; ++i) {
      const unsigned char ch = map_->data[i];
      if (ch >= 0x20 && ch < 0x7f) {
        shown += static_cast<char>(ch);
      } else {
        static const char* hex = "0123456789abcdef";
        shown += "\\x";
        shown += hex[ch >> 4];
        shown += hex[ch & 15];
      }
    }
    throw_error<FormatError>(path, ": not a GGUF file (bad magic: found \"", shown, "\", expected \"GGUF\")");
  }
  version_ = c.read<uint32_t>("the version");
  if (version_ != 2 && version_ != 3) {
    const bool swapped = __builtin_bswap32(version_) == 2 || __builtin_bswap32(version_) == 3;
    throw_error<FormatError>(path, ": unsupported GGUF version ", version_, swapped ? " (a big-endian file?)" : "",
                             " (supported: 2, 3)");
  }
  const uint64_t tensor_count = c.read<uint64_t>("the tensor count");
  const uint64_t kv_count = c.read<uint64_t>("the metadata count");
  // A metadata pair takes at least 13 bytes (key length, value type, a u8); a tensor info
  // at least 32 (name length, n_dims, one dimension, type, offset).
  if (kv_count > c.left() / 13 || tensor_count > c.left() / 32 || kv_count * 13 + tensor_count * 32 > c.left()) {
    throw_error<FormatError>(path, ": corrupt header: ", tensor_count, " tensors and ", kv_count,
                             " metadata pairs cannot fit in the file's ", size, " bytes");
  }

  keys_.reserve(kv_count);
  metadata_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key = c.read_string("metadata key " + std::to_string(i));
    if (!valid_utf8(key)) throw_error<FormatError>(path, ": metadata key ", i, " is not valid UTF-8");
    GgufValue v = read_value(c, path, key);
    if (metadata_.count(key) != 0) throw_error<FormatError>(path, ": duplicate metadata key '", key, "'");
    keys_.push_back(key);
    metadata_.emplace(std::move(key), std::move(v));
  }
  if (const GgufValue* a = find_value("general.alignment")) {
    if (a->type() != GgufType::U32) {
      throw_error<FormatError>(path, ": metadata 'general.alignment' must be a u32, got a ",
                               gguf_type_name(static_cast<uint32_t>(a->type())));
    }
    alignment_ = std::get<uint32_t>(a->value);
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
      throw_error<FormatError>(path, ": general.alignment ", alignment_, " is not a power of two");
  }

  tensors_.reserve(tensor_count);
  tensor_index_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensor t;
    t.name = c.read_string("tensor info " + std::to_string(i) + " (its name)");
    if (!valid_utf8(t.name)) throw_error<FormatError>(path, ": tensor info ", i, " has a name that is not valid UTF-8");
    const std::string what = "tensor " + t.name;
    const uint32_t n_dims = c.read<uint32_t>(what + " (its n_dims)");
    if (n_dims == 0 || n_dims > 4)
      throw_error<FormatError>(path, ": ", what, " has ", n_dims, " dimensions (expected 1 to 4)");
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t n = c.read<uint64_t>(what + " (its shape)");
      if (n == 0 || n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw_error<FormatError>(path, ": ", what, " has dimension ", d, " of ", static_cast<int64_t>(n),
                                 " (expected > 0)");
      if (numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(n))
        throw_error<FormatError>(path, ": ", what, " has a shape whose element count overflows int64");
      numel *= static_cast<int64_t>(n);
      t.ne.push_back(static_cast<int64_t>(n));
    }
    t.type_id = c.read<uint32_t>(what + " (its type)");
    const uint64_t rel = c.read<uint64_t>(what + " (its offset)");
    const auto info = moa::cpu::qtype_info(t.type_id);
    if (!info) {
      throw_error<FormatError>(path, ": tensor ", t.name, " has type ", moa::cpu::ggml_type_name(t.type_id),
                               " (ggml type ", t.type_id, "), which moa_engine does not serve (it serves ",
                               moa::cpu::served_qtype_names(), ")");
    }
    if (t.ne[0] % info->block_elems != 0) {
      throw_error<FormatError>(path, ": tensor ", t.name, " of type ", info->name, " has rows of ", t.ne[0],
                               " elements, not a multiple of its block size ", info->block_elems);
    }
    // nbytes = numel / block_elems * block_bytes, which cannot overflow once numel did not
    // (block_bytes <= 8 * block_elems for every served type) -- checked anyway.
    const uint64_t blocks = static_cast<uint64_t>(numel / info->block_elems);
    if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(info->block_bytes))
      throw_error<FormatError>(path, ": ", what, " is too large");
    t.nbytes = blocks * static_cast<uint64_t>(info->block_bytes);
    if (rel % alignment_ != 0) {
      throw_error<FormatError>(path, ": tensor ", t.name, " has offset ", rel,
                               " in the data section, not a multiple of the alignment ", alignment_);
    }
    t.offset = rel;  // made absolute below, once the data section's start is known
    if (tensor_index_.count(t.name) != 0) throw_error<FormatError>(path, ": duplicate tensor name '", t.name, "'");
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  data_offset_ = c.pos() + (alignment_ - c.pos() % alignment_) % alignment_;
  for (GgufTensor& t : tensors_) {
    const uint64_t rel = t.offset;
    if (rel > size || data_offset_ > size - rel || t.nbytes > size - rel - data_offset_) {
      throw_error<FormatError>(path, ": truncated file: tensor ", t.name, " needs bytes [", data_offset_ + rel, ", ",
                               data_offset_ + rel + t.nbytes, ") but the file has ", size, " bytes");
    }
    t.offset = data_offset_ + rel;
  }
}

const GgufValue* GgufFile::find_value(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {

const GgufValue& required_value(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.find_value(key);
  if (v == nullptr) throw_error<FormatError>(f.path(), ": missing metadata '", key, "'");
  return *v;
}

[[noreturn]] void wrong_type(const GgufFile& f, const std::string& key, const GgufValue& v, const char* expected) {
  std::string got = gguf_type_name(static_cast<uint32_t>(v.type()));
  if (v.type() == GgufType::ARRAY)
    got = "array of " + gguf_type_name(static_cast<uint32_t>(std::get<GgufArray>(v.value).elem_type));
  throw_error<FormatError>(f.path(), ": metadata '", key, "' must be ", expected, ", got a ", got);
}

const GgufArray& required_array(const GgufFile& f, const std::string& key) {
  const GgufValue& v = required_value(f, key);
  if (v.type() != GgufType::ARRAY) wrong_type(f, key, v, "an array");
  return std::get<GgufArray>(v.value);
}

}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = required_value(*this, key);
  if (v.type() != GgufType::STRING) wrong_type(*this, key, v, "a string");
  return std::get<std::string>(v.value);
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = required_value(*this, key);
  bool out_of_range = false;
  const auto i = as_int(v, out_of_range);
  if (out_of_range)
    throw_error<FormatError>(path(), ": metadata '", key, "' is out of range (", std::get<uint64_t>(v.value), ")");
  if (!i) wrong_type(*this, key, v, "an integer");
  return *i;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = required_value(*this, key);
  if (v.type() == GgufType::F32) return std::get<float>(v.value);
  if (v.type() == GgufType::F64) return std::get<double>(v.value);
  bool out_of_range = false;
  const auto i = as_int(v, out_of_range);
  if (out_of_range) return static_cast<double>(std::get<uint64_t>(v.value));
  if (!i) wrong_type(*this, key, v, "a number");
  return static_cast<double>(*i);
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = required_value(*this, key);
  if (v.type() != GgufType::BOOL) wrong_type(*this, key, v, "a bool");
  return std::get<bool>(v.value);
}

uint64_t GgufFile::array_length(const std::string& key) const { return required_array(*this, key).length; }

GgufType GgufFile::array_type(const std::string& key) const { return required_array(*this, key).elem_type; }

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufArray& a = required_array(*this, key);
  const GgufType t = a.elem_type;
  if (t == GgufType::F32 || t == GgufType::F64 || t == GgufType::STRING || t == GgufType::ARRAY)
    wrong_type(*this, key, required_value(*this, key), "an array of integers");
  std::vector<int64_t> out(a.length);
  for (uint64_t i = 0; i < a.length; ++i) {
    bool ok = false;
    out[i] = int_element(a, i, ok);
    if (!ok) throw_error<FormatError>(path(), ": metadata '", key, "' element ", i, " is out of range");
  }
  return out;
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const GgufArray& a = required_array(*this, key);
  if (a.elem_type == GgufType::STRING || a.elem_type == GgufType::ARRAY)
    wrong_type(*this, key, required_value(*this, key), "an array of numbers");
  std::vector<double> out(a.length);
  for (uint64_t i = 0; i < a.length; ++i) {
    const uint8_t* p = a.data + i * scalar_size(a.elem_type);
    if (a.elem_type == GgufType::F32) {
      out[i] = load<float>(p);
    } else if (a.elem_type == GgufType::F64) {
      out[i] = load<double>(p);
    } else if (a.elem_type == GgufType::U64) {
      out[i] = static_cast<double>(load<uint64_t>(p));
    } else {
      bool ok = false;
      out[i] = static_cast<double>(int_element(a, i, ok));
    }
  }
  return out;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufArray& a = required_array(*this, key);
  if (a.elem_type != GgufType::STRING) wrong_type(*this, key, required_value(*this, key), "an array of strings");
  std::vector<std::string> out;
  out.reserve(a.length);
  const uint8_t* p = a.data;  // every length was checked when the file was opened
  for (uint64_t i = 0; i < a.length; ++i) {
    const uint64_t n = load<uint64_t>(p);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), static_cast<size_t>(n));
    p += 8 + n;
  }
  return out;
}

const GgufTensor* GgufFile::find(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::data(const GgufTensor& t) const { return map_->data + t.offset; }

at::Tensor GgufFile::view(const GgufTensor& t) const {
  // from_blob over read-only memory: callers only read (copy out) from it.
  return at::from_blob(const_cast<uint8_t*>(data(t)), {static_cast<int64_t>(t.nbytes)},
                       at::TensorOptions().dtype(at::kByte));
}

void GgufFile::release(const GgufTensor& t) const {
  if (t.nbytes == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data(t));
  const uintptr_t lo = begin & ~(page - 1);
  const uintptr_t hi = (begin + t.nbytes + page - 1) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advisory: errors ignored
}

// ---------------------------------------------------------------------------------------
// config_from_gguf

bool gguf_permutes_qk(const std::string& arch) { return arch == "llama"; }

namespace {

struct ConfigReader {
  const GgufFile& f;
  std::string arch;

  std::string key(const char* suffix) const { return arch + "." + suffix; }

  // A per-model integer that llama.cpp also allows per layer (an array): an array must
  // hold one value for every layer.
  int64_t layer_int(const std::string& k) const {
    const GgufValue* v = f.find_value(k);
    if (v != nullptr && v->type() == GgufType::ARRAY) {
      const std::vector<int64_t> values = f.get_int_array(k);
      if (values.empty()) throw_error<FormatError>(f.path(), ": metadata '", k, "' is an empty array");
      for (int64_t x : values) {
        if (x != values[0]) {
          throw_error<FormatError>(f.path(), ": metadata '", k,
                                   "' differs between layers, which moa_engine does not support");
        }
      }
      return values[0];
    }
    return f.get_int(k);
  }
  int64_t positive(const std::string& k) const {
    if (!f.has(k)) throw_error<FormatError>(f.path(), ": missing required metadata '", k, "'");
    const int64_t v = layer_int(k);
    if (v <= 0) throw_error<FormatError>(f.path(), ": expected metadata '", k, "' > 0, got ", v);
    return v;
  }
  int64_t int_or(const std::string& k, int64_t fallback) const { return f.has(k) ? layer_int(k) : fallback; }
  double float_or(const std::string& k, double fallback) const { return f.has(k) ? f.get_float(k) : fallback; }
};

}  // namespace

ModelConfig config_from_gguf(const GgufFile& f) {
  const std::string& path = f.path();
  if (!f.has("general.architecture"))
    throw_error<FormatError>(path, ": missing required metadata 'general.architecture'");
  ConfigReader r{f, f.get_string("general.architecture")};
  const std::string& arch = r.arch;
  if (arch != "llama" && arch != "mistral" && arch != "qwen2") {
    throw_error<FormatError>(path, ": GGUF architecture '", arch,
                             "' is not supported (supported: llama, mistral, qwen2)");
  }
  ModelConfig c;
  c.model_type = arch;
  c.num_layers = r.positive(r.key("block_count"));
  c.hidden_size = r.positive(r.key("embedding_length"));
  c.intermediate_size = r.positive(r.key("feed_forward_length"));
  c.num_heads = r.positive(r.key("attention.head_count"));
  c.num_kv_heads = r.int_or(r.key("attention.head_count_kv"), c.num_heads);
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    throw_error<FormatError>(path, ": ", r.key("attention.head_count"), " (", c.num_heads, ") must be a multiple of ",
                             r.key("attention.head_count_kv"), " (", c.num_kv_heads, ")");
  }
  if (r.int_or(r.key("expert_count"), 0) > 0)
    throw_error<FormatError>(path, ": mixture-of-experts models (", r.key("expert_count"), ") are not supported");

  // head_dim: key_length, else the rotary dimensions (transformers' reading of llama
  // files), else hidden / heads. The engine rotates whole heads.
  const std::string key_length = r.key("attention.key_length");
  const std::string rope_dims = r.key("rope.dimension_count");
  if (f.has(key_length)) {
    c.head_dim = f.get_int(key_length);
  } else if (f.has(rope_dims)) {
    c.head_dim = f.get_int(rope_dims);
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      throw_error<FormatError>(path, ": ", r.key("embedding_length"), " (", c.hidden_size, ") is not a multiple of ",
                               r.key("attention.head_count"), " (", c.num_heads, ") and ", key_length, " is not given");
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    throw_error<FormatError>(path, ": expected an even head_dim > 0, got ", c.head_dim);
  const std::string value_length = r.key("attention.value_length");
  if (f.has(value_length) && f.get_int(value_length) != c.head_dim) {
    throw_error<FormatError>(path, ": ", value_length, " (", f.get_int(value_length), ") differs from the head_dim (",
                             c.head_dim, "), which moa_engine does not support");
  }
  if (f.has(rope_dims) && f.get_int(rope_dims) != c.head_dim) {
    throw_error<FormatError>(path, ": ", rope_dims, " (", f.get_int(rope_dims), ") differs from the head_dim (",
                             c.head_dim, "): partial rotary embeddings are not supported");
  }

  const std::string eps = r.key("attention.layer_norm_rms_epsilon");
  if (!f.has(eps)) throw_error<FormatError>(path, ": missing required metadata '", eps, "'");
  c.rms_norm_eps = f.get_float(eps);
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
    throw_error<FormatError>(path, ": expected metadata '", eps, "' > 0, got ", c.rms_norm_eps);
  c.rope_theta = r.float_or(r.key("rope.freq_base"), 10000.0);
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    throw_error<FormatError>(path, ": expected metadata '", r.key("rope.freq_base"), "' > 0, got ", c.rope_theta);
  c.max_position_embeddings = r.positive(r.key("context_length"));

  // Rope scaling. llama.cpp reads rope.scaling.type (default "linear") with
  // rope.scaling.factor (absent, 0 or 1: no scaling); older files have rope.scale_linear.
  const std::string scaling_type = r.key("rope.scaling.type");
  const std::string type = f.has(scaling_type) ? f.get_string(scaling_type) : "linear";
  const double factor = r.float_or(r.key("rope.scaling.factor"), 0.0);
  const double scale_linear = r.float_or(r.key("rope.scale_linear"), 1.0);
  if (type != "none" && ((factor != 0.0 && factor != 1.0) || (f.has(scaling_type) && type != "linear"))) {
    throw_error<FormatError>(path, ": rope scaling '", type, "' (", r.key("rope.scaling.factor"), " = ", factor,
                             ") is not supported (supported: none; llama3 scaling is not supported from GGUF yet)");
  }
  if (scale_linear != 1.0) {
    throw_error<FormatError>(path, ": rope scaling '", r.key("rope.scale_linear"), "' = ", scale_linear,
                             " is not supported");
  }
  if (f.find("rope_freqs.weight") != nullptr) {
    throw_error<FormatError>(path,
                             ": the file has rope_freqs.weight (llama3 rope scaling); llama3 rope scaling from GGUF "
                             "is not supported yet");
  }

  const int64_t window = r.int_or(r.key("attention.sliding_window"), 0);
  if (window < 0) throw_error<FormatError>(path, ": expected ", r.key("attention.sliding_window"), " >= 0");
  if (arch != "qwen2") c.sliding_window = window;

  // Vocabulary: the metadata, else the tokenizer, else the embedding's rows.
  if (f.has(r.key("vocab_size"))) {
    c.vocab_size = r.positive(r.key("vocab_size"));
  } else if (f.has("tokenizer.ggml.tokens")) {
    c.vocab_size = static_cast<int64_t>(f.array_length("tokenizer.ggml.tokens"));
  } else if (const GgufTensor* e = f.find("token_embd.weight"); e != nullptr && e->ne.size() == 2) {
    c.vocab_size = e->ne[1];
  } else {
    throw_error<FormatError>(path, ": no vocabulary size (no ", r.key("vocab_size"),
                             ", tokenizer.ggml.tokens or 2-D token_embd.weight)");
  }
  if (c.vocab_size <= 0) throw_error<FormatError>(path, ": expected a vocabulary size > 0, got ", c.vocab_size);

  c.attention_bias = f.find("blk.0.attn_q.bias") != nullptr;
  if (f.find("blk.0.ffn_up.bias") != nullptr || f.find("blk.0.ffn_down.bias") != nullptr ||
      f.find("blk.0.ffn_gate.bias") != nullptr)
    throw_error<FormatError>(path, ": MLP biases (blk.0.ffn_*.bias) are not supported");
  c.tie_word_embeddings = f.find("output.weight") == nullptr;
  c.torch_dtype = "";

  c.bos_token_id = f.has("tokenizer.ggml.bos_token_id") ? f.get_int("tokenizer.ggml.bos_token_id") : -1;
  if (f.has("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(f.get_int("tokenizer.ggml.eos_token_id"));
  if (f.has("tokenizer.ggml.eot_token_id")) {
    const int64_t eot = f.get_int("tokenizer.ggml.eot_token_id");
    if (c.eos_token_ids.empty() || c.eos_token_ids[0] != eot) c.eos_token_ids.push_back(eot);
  }
  return c;
}

}  // namespace moa::engine
