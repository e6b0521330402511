// moa_config.json: what a MoA directory is (docs/moa-format.md, "moa_config.json").
// Every key is required and no other is allowed; errors read "<file>: field 'x': problem".
#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include "engine/moa_dir.h"
#include "engine/moa_format_util.h"

namespace moa::engine {
namespace {

using namespace moa_format;

// Unknown fields first, then missing ones.
void check_keys(const json& j, const std::string& prefix, const std::vector<std::string>& allowed) {
  std::vector<std::string> unknown, missing, named;
  for (const auto& [key, value] : j.items())
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) unknown.push_back(prefix + key);
  std::sort(unknown.begin(), unknown.end());
  for (const auto& key : allowed) {
    named.push_back(prefix + key);
    if (!j.contains(key)) missing.push_back(prefix + key);
  }
  if (!unknown.empty()) throw_error<FormatError>("unknown field(s) ", join(unknown), " (allowed: ", join(named), ")");
  if (!missing.empty()) throw_error<FormatError>("missing field(s) ", join(missing));
}

[[noreturn]] void bad_field(const std::string& field, const std::string& expected, const json& got) {
  throw_error<FormatError>("field '", field, "': expected ", expected, ", got ", type_name(got), " ", describe(got));
}

std::string string_field(const json& j, const std::string& field) {
  if (!j.is_string()) bad_field(field, "str", j);
  return j.get<std::string>();
}

// A safe folder name: ^[A-Za-z0-9][A-Za-z0-9_.-]*$ in ASCII.
bool is_safe_folder_name(const std::string& name) {
  bool safe = !name.empty() && std::isalnum(static_cast<unsigned char>(name[0])) && (name[0] & 0x80) == 0;
  for (char ch : name) {
    const auto c = static_cast<unsigned char>(ch);
    safe = safe && c < 0x80 && (std::isalnum(c) || c == '_' || c == '.' || c == '-');
  }
  return safe;
}

// A domain name is a safe folder name, not "base" (no expert), unique ignoring case (it
// names a folder, and some file systems ignore case).
std::vector<std::string> read_domains(const json& j) {
  if (!j.is_array()) bad_field("domains", "list", j);
  if (j.empty()) throw_error<FormatError>("field 'domains': needs at least one domain");
  std::vector<std::string> out;
  std::map<std::string, std::string> seen;  // lower case -> as given
  for (const json& v : j) {
    const std::string name = string_field(v, "domains[]");
    if (name.empty()) throw_error<FormatError>("field 'domains': a domain name is empty");
    if (!is_safe_folder_name(name))
      throw_error<FormatError>("field 'domains': '", name,
                               "' is not a safe folder name (expected ^[A-Za-z0-9][A-Za-z0-9_.-]*$)");
    std::string lower = name;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower == moa::kBaseDomain)  // "base" means no expert
      throw_error<FormatError>("field 'domains': '", name, "' is reserved (it means no expert)");
    if (seen.count(lower))
      throw_error<FormatError>("field 'domains': '", name, "' duplicates '", seen[lower],
                               "' (names are compared ignoring case)");
    seen[lower] = name;
    out.push_back(name);
  }
  return out;
}

std::vector<std::string> read_target_modules(const json& j) {
  if (!j.is_array()) bad_field("target_modules", "list", j);
  if (j.empty()) throw_error<FormatError>("field 'target_modules': is empty");
  std::vector<std::string> out;
  for (const json& v : j) {
    const std::string m = string_field(v, "target_modules[]");
    if (module_index(m) < 0)
      throw_error<FormatError>("field 'target_modules': '", m, "' is not one of ", join(moa_target_modules()));
    if (std::find(out.begin(), out.end(), m) != out.end())
      throw_error<FormatError>("field 'target_modules': '", m, "' is given twice");
    out.push_back(m);
  }
  return out;
}

int64_t read_format_version(const json& version) {
  if (!version.is_number_integer()) bad_field("format_version", "int", version);
  if (version.is_number_unsigned() ? version.get<uint64_t>() > static_cast<uint64_t>(kFormatVersion)
                                   : version.get<int64_t>() > kFormatVersion)
    throw_error<FormatError>("field 'format_version': ", describe(version), " is newer than this moa_engine supports (",
                             kFormatVersion, "); upgrade moa_engine");
  const int64_t v = version.get<int64_t>();
  if (v < 1) throw_error<FormatError>("field 'format_version': ", v, " is not a valid version (>= 1)");
  return v;
}

void read_router_options(const json& router, MoaConfig& c) {
  if (!router.is_object()) bad_field("router", "an object", router);
  check_keys(router, "router.", {"pooling", "strategy"});
  c.pooling = string_field(router["pooling"], "router.pooling");
  c.strategy = string_field(router["strategy"], "router.strategy");
  if (c.pooling != "mean")
    throw_error<FormatError>("field 'router.pooling': '", c.pooling, "' is not supported (expected one of ['mean'])");
  parse_routing_strategy<FormatError>(c.strategy, "field 'router.strategy':");
}

double read_eta(const json& eta) {
  if (!eta.is_number()) bad_field("eta", "int or float", eta);  // nlohmann: a bool is not a number
  const double v = eta.get<double>();
  if (!std::isfinite(v) || v < 0)
    throw_error<FormatError>("field 'eta': ", describe(eta), " is not a finite number >= 0");
  return v;
}

MoaConfig moa_config_from_json(const json& j) {
  if (!j.is_object()) throw_error<FormatError>("expected a JSON object, got ", type_name(j));
  check_keys(j, "", {"format_version", "base_model", "domains", "target_modules", "router", "eta"});
  MoaConfig c;
  c.format_version = read_format_version(j["format_version"]);
  c.base_model = string_field(j["base_model"], "base_model");
  if (c.base_model.empty()) throw_error<FormatError>("field 'base_model': is empty");
  c.domains = read_domains(j["domains"]);
  c.target_modules = read_target_modules(j["target_modules"]);
  read_router_options(j["router"], c);
  c.eta = read_eta(j["eta"]);
  return c;
}

}  // namespace

const std::vector<std::string>& moa_target_modules() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& [name, parent] : module_parents()) out.push_back(name);
    return out;
  }();
  return names;
}

MoaConfig parse_moa_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_text<json>(json_text, source);
  try {
    return moa_config_from_json(j);
  } catch (const FormatError& e) {
    throw_error<FormatError>(source, ": ", e.what());
  }
}

MoaConfig read_moa_config(const std::string& path) { return parse_moa_config(read_text_file(path), path); }

}  // namespace moa::engine
