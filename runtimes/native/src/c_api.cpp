// The C API (include/mode_edge.h) over Session: exceptions become a status and a thread-local message.
#include <memory>
#include <sstream>
#include <string>

#include "errors.h"
#include "mode_edge.h"
#include "session.h"

struct mode_edge_session {
  std::unique_ptr<mode_edge::Session> session;
  std::string profile = "{}";
};

namespace {

thread_local std::string last_error;

template <class F>
mode_edge_status guarded(F fn) {
  try {
    fn();
    last_error.clear();
    return MODE_EDGE_OK;
  } catch (const mode_edge::UserError& e) {
    last_error = e.what();
    return MODE_EDGE_USER_ERROR;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return MODE_EDGE_INTERNAL_ERROR;
  } catch (...) {
    last_error = "internal error: an unknown exception";
    return MODE_EDGE_INTERNAL_ERROR;
  }
}

}  // namespace

extern "C" {

void mode_edge_default_options(mode_edge_options* o) { *o = {0.0, 0, 1, nullptr, nullptr}; }

void mode_edge_default_generate_options(mode_edge_generate_options* o) {
  *o = {"auto", 1, "centroid", 64, 0.0, 0, 1.0, 0, nullptr, 0, nullptr, 0};
}

mode_edge_status mode_edge_open(const char* bundle, const mode_edge_options* options, mode_edge_session** out) {
  return guarded([&] {
    if (!bundle || !out) throw mode_edge::UserError("mode_edge_open: bundle and session must not be NULL");
    *out = nullptr;
    mode_edge_options o;
    mode_edge_default_options(&o);
    if (options) o = *options;
    mode_edge::SessionOptions so;
    so.budget_mb = o.budget_mb;
    so.threads = o.threads;
    so.verify = o.verify != 0;
    so.ort_library = o.ort_library ? o.ort_library : "";
    std::stringstream keys(o.trusted_keys ? o.trusted_keys : "");
    for (std::string line; std::getline(keys, line);)
      if (line.find_first_not_of(" \t\r") != std::string::npos) so.trusted_keys.push_back(line);
    if (o.trusted_keys && so.trusted_keys.empty())  // pinning asked for, with nothing to pin: never "no check"
      throw mode_edge::UserError("trusted_keys holds no key; give one public key per line (a .pub file's line or its "
                                 "path), or NULL to pin none");
    auto s = std::make_unique<mode_edge_session>();
    s->session = std::make_unique<mode_edge::Session>(bundle, so);
    *out = s.release();
  });
}

mode_edge_status mode_edge_select(mode_edge_session* s, const char* const* experts, size_t n) {
  return guarded([&] {
    if (!s || (n && !experts)) throw mode_edge::UserError("mode_edge_select: session and experts must not be NULL");
    std::vector<std::string> names;
    for (size_t i = 0; i < n; i++) {
      if (!experts[i]) throw mode_edge::UserError("mode_edge_select: expert name " + std::to_string(i) + " is NULL");
      names.push_back(experts[i]);
    }
    s->session->select(names);
  });
}

mode_edge_status mode_edge_generate(mode_edge_session* s, const int64_t* prompt, size_t n_prompt,
                                    const mode_edge_generate_options* options, mode_edge_token_callback on_token,
                                    void* user_data) {
  return guarded([&] {
    if (!s || (n_prompt && !prompt)) throw mode_edge::UserError("mode_edge_generate: session and prompt must not be NULL");
    mode_edge_generate_options o;
    mode_edge_default_generate_options(&o);
    if (options) o = *options;
    mode_edge::GenerateOptions g;
    if (o.experts) g.experts = std::string(o.experts);
    else g.experts.reset();  // NULL: the experts mode_edge_select made active
    g.route_top_k = o.route_top_k;
    g.router = o.router ? o.router : "centroid";
    g.max_new_tokens = o.max_new_tokens;
    g.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
    if (o.n_route_ids && !o.route_ids) throw mode_edge::UserError("mode_edge_generate: route_ids must not be NULL");
    g.chat = o.chat != 0;
    if (o.n_route_ids) g.route_ids.assign(o.route_ids, o.route_ids + o.n_route_ids);
    if (o.on_logits) g.on_logits = [&](const std::vector<float>& l) { o.on_logits(l.data(), l.size(), user_data); };
    s->session->generate(std::vector<int64_t>(prompt, prompt + n_prompt), g,
                         [&](int64_t token) { return on_token ? on_token(token, user_data) != 0 : true; });
    // (paths in warnings may hold bytes that are not UTF-8: replaced, not thrown on)
    s->profile = s->session->profile().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  });
}

const char* mode_edge_profile_json(mode_edge_session* s) { return s ? s->profile.c_str() : "{}"; }

const char* mode_edge_last_error(void) { return last_error.c_str(); }

void mode_edge_close(mode_edge_session* s) { delete s; }

}  // extern "C"
