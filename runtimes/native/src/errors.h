// Errors of the native runtime. A UserError is a problem the user can fix (a damaged bundle, a missing pack, a bad
// option): one line naming it and the fix, exit code 2 in the CLI, MODE_EDGE_USER_ERROR in the C API. Anything else
// that escapes is a bug or an environment failure (onnxruntime refusing a graph it should run).
#pragma once
#include <stdexcept>
#include <string>

namespace mode_edge {

struct UserError : std::runtime_error {
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

// The fixes the messages name, as the Python runtime words them (mode_edge/bundle.py).
inline const char* kReexport = "export the bundle again (`mode-edge export --overwrite`) or copy it again";

}  // namespace mode_edge
