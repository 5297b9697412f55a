// Expert names as mode_edge/names.py allows them: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}, not "auto" or "none" (any case),
// which --experts gives meanings of their own. A name from the command line or a manifest is checked before it
// touches a path.
#pragma once
#include <algorithm>
#include <cctype>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"

namespace mode_edge {

inline bool plain_name(const std::string& name) {
  auto alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); };
  if (name.empty() || name.size() > 64 || !alnum(name[0])) return false;
  if (!std::all_of(name.begin(), name.end(), [&](char c) { return alnum(c) || c == '-' || c == '_' || c == '.'; }))
    return false;
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return lower != "auto" && lower != "none";
}

// Each name plain and named once; else UserError "WHERE: ...".
inline std::vector<std::string> check_names(const std::vector<std::string>& names, const std::string& where) {
  for (auto& n : names) {
    std::string lower(n);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower == "auto" || lower == "none")
      throw UserError(where + ": '" + n + "' is a reserved word, not an expert name: '" + lower + "' alone means " +
                      (lower == "auto" ? "route on the prompt" : "the bare base") +
                      ", written in lower case and not in a list");
    if (!plain_name(n))
      throw UserError(where + ": expert name '" + n + "' is not a plain name; use 1-64 letters, digits, '_', '-' or "
                      "'.', starting with a letter or digit (not 'auto' or 'none')");
    if (std::count(names.begin(), names.end(), n) > 1)
      throw UserError(where + ": expert " + n + " is named twice; name each once");
  }
  return names;
}

// A comma-separated list ("code, math"): items stripped of spaces, empty ones dropped, then checked.
inline std::vector<std::string> split_names(const std::string& value, const std::string& where) {
  std::vector<std::string> names;
  std::stringstream parts(value);
  for (std::string n; std::getline(parts, n, ',');) {
    size_t a = n.find_first_not_of(" \t"), b = n.find_last_not_of(" \t");
    if (a != std::string::npos) names.push_back(n.substr(a, b - a + 1));
  }
  return check_names(names, where);
}

}  // namespace mode_edge
