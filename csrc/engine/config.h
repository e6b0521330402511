// Reads an HF config.json (and generation_config.json beside it) into moa::ModelConfig.
#pragma once

#include <string>

#include "moa/engine.h"

namespace moa::engine {

// model_dir/config.json must exist and name a supported model_type; throws
// FileNotFound or FormatError naming the file and the field.
ModelConfig read_model_config(const std::string& model_dir);

// The same from JSON text; `source` names it in error messages.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);

}  // namespace moa::engine
