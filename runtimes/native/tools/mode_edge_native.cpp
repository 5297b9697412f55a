// mode-edge-native: the native runtime's command line, a thin layer over the C API (include/mode_edge.h).
//   mode-edge-native run BUNDLE --ids 1,2,3 [options]      new token ids on stdout as they come, one line
//   mode-edge-native bench BUNDLE --ids-file F [options]   the same generation --repeats times in this process
// Both write the profile JSON (the Python runtime's schema) with --json PATH. Exit 2 for a problem the user can fix.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mode_edge.h"

namespace {

const char* kUsage =
    "usage: mode-edge-native run|bench BUNDLE (--ids 1,2,3 | --ids-file FILE) [options]\n"
    "\n"
    "Generates from token ids with a mode-edge bundle (ONNX, format version 2) on onnxruntime's C API.\n"
    "Token ids in and out: `mode-edge tokenize --bundle B --prompt TEXT` gives a prompt's ids, --decode the text.\n"
    "\n"
    "  --ids LIST             prompt token ids, comma- or space-separated\n"
    "  --ids-file FILE        prompt token ids in a file or pipe (whitespace, commas or a JSON list; - : stdin)\n"
    "  --experts X            auto (route on the prompt, default), none, or comma-separated names\n"
    "  --chat                 the ids are a chat prompt (`mode-edge tokenize --chat`): stop at the end of the\n"
    "                         assistant's turn too\n"
    "  --route-ids LIST       auto routes on these ids instead (the user's message: `mode-edge tokenize --prompt`)\n"
    "  --router R             centroid (default), logistic or gate, for --experts auto\n"
    "  --route-top-k K        most experts auto picks (default 1)\n"
    "  --max-new-tokens N     default 64\n"
    "  --temperature T        >= 0; 0: greedy (default)\n"
    "  --top-k K              sample among the K likeliest tokens; 0: off (default); above the vocabulary: all\n"
    "  --top-p P              in (0, 1]: the smallest set of tokens holding P of the probability; 1: all (default)\n"
    "  --seed S               0 .. 4294967295 (default 0); the same random stream as mode-edge run's, so a seed\n"
    "                         samples its tokens\n"
    "  --budget-mb MB         memory budget for base + experts (weight bytes on disk)\n"
    "  --threads N            intra-op threads (default: one per physical core)\n"
    "  --ort-lib PATH         libonnxruntime.so to load, C API >= 1.23 (default: $MODE_EDGE_ORT_LIB, then\n"
    "                         libonnxruntime.so on the loader's path; the onnxruntime wheel's file is\n"
    "                         onnxruntime/capi/libonnxruntime.so.VERSION)\n"
    "  --no-verify            skip the checks of the files' sizes and sha256 against the manifests\n"
    "  --trust PUB            load only packs signed by this key (a .pub file from `mode-edge keys generate`, or\n"
    "                         its line; repeat for several): what an app pins outside the writable bundle\n"
    "  --json PATH            write the profile JSON there\n"
    "  --logits PATH          run: write each step's logits there (float32, steps x vocabulary), for parity checks\n"
    "  --repeats N            bench: generations in this process (default 3; the first includes the loads)\n"
    "  --alternate A,B        bench: run expert A, then B, then A ... (an expert switch before each run; with a\n"
    "                         --budget-mb that holds one expert, each evicts the other and loads anew; the\n"
    "                         summary gives the median expert load)\n";

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A number option in [lo, hi] (an integer where `integer`), checked before any cast.
double number(const std::string& option, const std::string& value, double lo, double hi, bool integer,
              bool lo_open = false) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(value.c_str(), &end);
  bool ok = end && *end == 0 && !value.empty() && errno == 0 && std::isfinite(v) && (lo_open ? v > lo : v >= lo) &&
            v <= hi && (!integer || v == std::floor(v));
  if (!ok) {
    std::ostringstream range;
    range << std::fixed << std::setprecision(integer ? 0 : 1) << (lo_open ? "> " : ">= ") << lo << " and <= " << hi;
    throw Usage(option + " must be " + (integer ? "an integer " : "a number ") + range.str() + ", got '" + value + "'");
  }
  return v;
}

std::vector<int64_t> parse_ids(std::string text, const std::string& where) {
  for (char& c : text)
    if (c == ',' || c == '[' || c == ']' || c == '\n' || c == '\t' || c == '\r') c = ' ';
  std::vector<int64_t> ids;
  std::stringstream in(text);
  for (std::string word; in >> word;) {
    char* end = nullptr;
    long long v = std::strtoll(word.c_str(), &end, 10);
    if (!end || *end || v < 0) {
      std::string shown;  // printable and short: a binary file's bytes stay out of the message
      for (char c : word.substr(0, 20)) shown += std::isprint(static_cast<unsigned char>(c)) ? c : '?';
      throw Usage(where + ": '" + shown + "' is not a token id (an integer >= 0)");
    }
    ids.push_back(v);
  }
  if (ids.empty()) throw Usage(where + " holds no token ids; give at least one");
  return ids;
}

// Writes text to path whole or not at all: a temporary file beside it, renamed over it.
void write_atomically(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!(f << text) || !(f.flush())) throw Usage("--json " + path + " cannot be written; choose a writable path");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Usage("--json " + path + " cannot be written; choose a writable path");
  }
}

int fail(mode_edge_status status) {
  std::fprintf(stderr, "error: %s\n", mode_edge_last_error());
  return status == MODE_EDGE_USER_ERROR ? 2 : 1;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? NAN : v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

struct Printed {
  int tokens = 0;
  std::FILE* logits = nullptr;
};

void write_logits(const float* logits, size_t n, void* user) {
  auto* out = static_cast<Printed*>(user);
  if (out && out->logits) std::fwrite(logits, sizeof(float), n, out->logits);
}

int print_token(int64_t token, void* user) {
  if (auto* printed = static_cast<Printed*>(user)) {  // run: ids as they come; bench: nothing
    std::printf("%s%lld", printed->tokens++ ? " " : "", static_cast<long long>(token));
    std::fflush(stdout);
  }
  return 1;
}

// The text of --ids-file: a file, a pipe, or "-" for standard input.
std::string read_ids_file(const std::string& path) {
  if (path == "-") {
    std::ostringstream text;
    text << std::cin.rdbuf();
    return text.str();
  }
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw Usage("--ids-file " + path + " does not exist");
  if (S_ISDIR(st.st_mode)) throw Usage("--ids-file " + path + " is a folder; give a file of token ids (or - for stdin)");
  std::ifstream f(path, std::ios::binary);
  std::ostringstream text;
  if (!f || !(text << f.rdbuf())) throw Usage("--ids-file " + path + " cannot be read");
  return text.str();
}

// Options that take a value, by command (the others: --no-verify, --chat, --help).
const std::vector<std::string> kValueOptions = {
    "--ids", "--ids-file", "--experts", "--router", "--route-top-k", "--max-new-tokens", "--temperature", "--top-k",
    "--top-p", "--seed", "--budget-mb", "--threads", "--ort-lib", "--json", "--logits", "--repeats", "--alternate",
    "--trust", "--route-ids"};

void check_option(const std::string& command, const std::string& opt) {
  if (opt == "--prompt")
    throw Usage("the native runtime takes token ids, not text: `mode-edge tokenize --bundle BUNDLE --prompt TEXT` "
                "gives them (for --ids)");
  if (opt == "--bundle") throw Usage("BUNDLE is the first argument after the command: mode-edge-native " + command +
                                     " BUNDLE --ids ...");
  bool known = std::find(kValueOptions.begin(), kValueOptions.end(), opt) != kValueOptions.end();
  if (!known || (opt == "--logits" && command != "run") ||
      ((opt == "--repeats" || opt == "--alternate") && command != "bench"))
    throw Usage("unknown option " + opt + " for " + command + " (see mode-edge-native --help)");
}

int main_(int argc, char** argv) {
  auto help = [](int i, int argc, char** argv) {
    for (; i < argc; i++)
      if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) return true;
    return false;
  };
  if (argc < 2 || help(1, argc, argv)) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string command = argv[1];
  if (command != "run" && command != "bench") throw Usage("unknown command '" + command + "'; use run or bench");
  if (argc < 3 || argv[2][0] == '-') {
    if (argc >= 3) check_option(command, argv[2]);  // --bundle, --prompt: say what to do instead
    throw Usage(command + " needs the BUNDLE folder first: mode-edge-native " + command + " BUNDLE --ids ...");
  }
  std::string bundle = argv[2], json_path, logits_path, ort_lib, experts = "auto", router = "centroid", ids_from, trusted;
  std::vector<std::string> alternate;
  std::vector<int64_t> ids, route_ids;
  mode_edge_options o;
  mode_edge_default_options(&o);
  mode_edge_generate_options g;
  mode_edge_default_generate_options(&g);
  int repeats = 3;
  for (int i = 3; i < argc; i++) {
    std::string opt = argv[i];
    if (opt == "--no-verify") {
      o.verify = 0;
      continue;
    }
    if (opt == "--chat") {
      g.chat = 1;
      continue;
    }
    if (opt.rfind("--", 0) != 0) throw Usage("unexpected argument '" + opt + "' (see mode-edge-native --help)");
    check_option(command, opt);
    if (i + 1 >= argc) throw Usage(opt + " needs a value (see mode-edge-native --help)");
    std::string v = argv[++i];
    if (opt == "--ids" || opt == "--ids-file") {
      if (!ids_from.empty()) throw Usage("give the prompt's token ids once: " + ids_from + " and " + opt + " both");
      ids_from = opt;
      ids = parse_ids(opt == "--ids" ? v : read_ids_file(v), opt == "--ids" ? "--ids" : v);
    } else if (opt == "--route-ids") {
      route_ids = parse_ids(v, "--route-ids");
    } else if (opt == "--experts") {
      experts = v;
      if (experts.find_first_not_of(" ,") == std::string::npos)
        throw Usage("--experts is empty; give auto, none or comma-separated expert names");
    } else if (opt == "--router") router = v;
    else if (opt == "--route-top-k") g.route_top_k = static_cast<int>(number(opt, v, 1, 1e9, true));  // all, above
    else if (opt == "--max-new-tokens") g.max_new_tokens = static_cast<int64_t>(number(opt, v, 1, 1e9, true));
    else if (opt == "--temperature") g.temperature = number(opt, v, 0, 1e9, false);
    else if (opt == "--top-k") g.top_k = static_cast<int64_t>(number(opt, v, 0, 1e15, true));  // >= vocabulary: all
    else if (opt == "--top-p") g.top_p = number(opt, v, 0, 1, false, true);
    else if (opt == "--seed") g.seed = static_cast<uint64_t>(number(opt, v, 0, 4294967295.0, true));
    else if (opt == "--budget-mb") o.budget_mb = number(opt, v, 0, 1e9, false, true);
    else if (opt == "--threads") o.threads = static_cast<int>(number(opt, v, 1, 1024, true));
    else if (opt == "--ort-lib") ort_lib = v;
    else if (opt == "--trust") {
      if (v.find('\n') != std::string::npos) throw Usage("--trust takes one key per option; repeat --trust for several");
      if (v.find_first_not_of(" \t\r") == std::string::npos)
        throw Usage("--trust is empty; give a .pub file from `mode-edge keys generate` or its line");
      trusted += v + "\n";
    }
    else if (opt == "--json") json_path = v;
    else if (opt == "--logits") logits_path = v;
    else if (opt == "--repeats") repeats = static_cast<int>(number(opt, v, 1, 1e6, true));
    else if (opt == "--alternate") {
      std::stringstream parts(v);
      for (std::string name; std::getline(parts, name, ',');) alternate.push_back(name);
      if (alternate.size() != 2 || alternate[0] == alternate[1] || alternate[0] == "auto" || alternate[0] == "none" ||
          alternate[1] == "auto" || alternate[1] == "none")
        throw Usage("--alternate takes two different expert names, A,B");
    }
  }
  if (ids.empty()) throw Usage("give the prompt's token ids with --ids or --ids-file (mode-edge tokenize makes them)");
  if (!alternate.empty() && experts != "auto") throw Usage("--alternate chooses the experts; leave out --experts");
  if (!json_path.empty()) {  // a path that cannot be written is said before the work, not after it
    std::ofstream probe(json_path + ".tmp");
    if (!probe) throw Usage("--json " + json_path + " cannot be written; choose a writable path");
    probe.close();
    std::remove((json_path + ".tmp").c_str());
  }
  g.experts = experts.c_str();
  g.router = router.c_str();
  o.ort_library = ort_lib.empty() ? nullptr : ort_lib.c_str();
  o.trusted_keys = trusted.empty() ? nullptr : trusted.c_str();
  g.route_ids = route_ids.empty() ? nullptr : route_ids.data();
  g.n_route_ids = route_ids.size();
  mode_edge_session* s = nullptr;
  if (auto status = mode_edge_open(bundle.c_str(), &o, &s)) return fail(status);
  std::unique_ptr<mode_edge_session, void (*)(mode_edge_session*)> owned(s, mode_edge_close);
  nlohmann::json out;
  if (command == "run") {
    Printed printed;
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> logits(nullptr, std::fclose);
    if (!logits_path.empty()) {
      logits.reset(std::fopen(logits_path.c_str(), "wb"));
      if (!logits) throw Usage("--logits " + logits_path + " cannot be written; choose a writable path");
      printed.logits = logits.get();
      g.on_logits = write_logits;
    }
    if (auto status = mode_edge_generate(s, ids.data(), ids.size(), &g, print_token, &printed)) {
      if (printed.tokens) std::printf("\n");
      std::fflush(stdout);  // the ids' line ends before the error's
      return fail(status);
    }
    std::printf("\n");
    out = nlohmann::json::parse(mode_edge_profile_json(s));
    std::string chosen;  // as mode-edge run says it, on stderr
    for (auto& e : out["experts"]) chosen += (chosen.empty() ? "" : ", ") + e.get<std::string>();
    if (out["router"].is_string()) chosen = (chosen.empty() ? "none" : chosen) + ", chosen by the " +
                                            out["router"].get<std::string>() + " router";
    std::fprintf(stderr, "[experts: %s; %lld tokens, %.1f tok/s decode]\n", chosen.empty() ? "none" : chosen.c_str(),
                 out["new_tokens"].get<long long>(),
                 out["decode_tokens_per_s"].is_number() ? out["decode_tokens_per_s"].get<double>() : 0.0);
  } else {
    std::vector<double> decode, ttft, switches;
    out = {{"runs", nlohmann::json::array()}};
    for (int r = 0; r < repeats; r++) {
      if (!alternate.empty()) g.experts = alternate[r % 2].c_str();
      if (auto status = mode_edge_generate(s, ids.data(), ids.size(), &g, print_token, nullptr)) return fail(status);
      auto p = nlohmann::json::parse(mode_edge_profile_json(s));
      out["runs"].push_back(p);
      if (r > 0 || repeats == 1) {  // the first run pays the loads; the medians are of the others
        if (p["decode_tokens_per_s"].is_number()) decode.push_back(p["decode_tokens_per_s"]);
        ttft.push_back(p["time_to_first_token_s"]);
        if (!alternate.empty() && p["load_s"].contains("expert " + alternate[r % 2]))
          switches.push_back(p["load_s"]["expert " + alternate[r % 2]]);
      }
    }
    out["median"] = {{"decode_tokens_per_s", median(decode)}, {"time_to_first_token_s", median(ttft)}};
    std::printf("decode %.1f tok/s, TTFT %.1f ms (median of %zu)", median(decode), 1000 * median(ttft), ttft.size());
    if (!switches.empty()) {
      out["median"]["expert_load_s"] = median(switches);
      std::printf("; expert load at a switch %.1f ms (median of %zu)", 1000 * median(switches), switches.size());
    }
    std::printf("\n");
  }
  if (!json_path.empty())
    write_atomically(json_path, out.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return main_(argc, argv);
  } catch (const Usage& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
    return 1;
  }
}
