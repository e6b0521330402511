// JSON helpers shared by the config.json and MoA-directory readers: reading a file, parsing
// it with a message that names it, and describing a value for error messages.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

#include "moa/errors.h"

namespace moa::engine {

// A file's bytes; FileNotFound when it is not a regular file or cannot be opened.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw_error<FileNotFound>(path.string(), ": no such file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error<FileNotFound>(path.string(), ": cannot open the file");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Parsed JSON; FormatError naming `source` when the text is not JSON. Json may be
// nlohmann::ordered_json, which keeps the file's key order.
template <typename Json = nlohmann::json>
Json parse_json_text(const std::string& text, const std::string& source) {
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_error<FormatError>(source, ": not valid JSON (", e.what(), ")");
  }
}

// A short description of a JSON value for error messages. nlohmann's dump() recurses over
// nesting (a hostile file nested 100k deep overflows the stack), so containers are only
// described, never printed; scalars are printed and cut at 80 characters.
inline std::string describe_json(const nlohmann::json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " items";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

}  // namespace moa::engine
