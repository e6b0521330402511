// Exceptions thrown by moa_core's engine. Every message names what was wrong: the
// argument, file or tensor, what was expected and what was given. The Python bindings
// map them to ValueError (InvalidArgument, FormatError), FileNotFoundError
// (FileNotFound) and RuntimeError (Error).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moa {

// Base class: anything moa_core throws on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bad argument: an empty prompt, max_new_tokens <= 0, an unknown option value.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file that cannot be used: corrupt safetensors, a bad config.json, a missing or
// mis-shaped tensor, an unsupported architecture.
class FormatError : public Error {
 public:
  using Error::Error;
};

// A file or folder that does not exist.
class FileNotFound : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

// throw_error<FormatError>("config.json: expected ", a, ", got ", b)
template <typename E, typename... Args>
[[noreturn]] void throw_error(Args&&... args) {
  throw E(detail::concat(std::forward<Args>(args)...));
}

}  // namespace moa
