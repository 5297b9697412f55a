/* mode-edge native runtime: the C API an app links (a JNI, Swift or Rust wrapper is a thin layer over it).
 *
 * Token ids in and out: tokenization stays at the edge (the bundle's tokenizer.json, e.g. with Hugging Face
 * tokenizers). onnxruntime is loaded at run time from the library the app ships (libonnxruntime.so, C API >= 1.23).
 *
 *   mode_edge_options o; mode_edge_default_options(&o); o.budget_mb = 300;
 *   mode_edge_session* s;
 *   if (mode_edge_open("bundle", &o, &s) != MODE_EDGE_OK) { fprintf(stderr, "%s\n", mode_edge_last_error()); ... }
 *   mode_edge_generate_options g; mode_edge_default_generate_options(&g); g.experts = "code";
 *   mode_edge_generate(s, prompt_ids, n, &g, on_token, user_data);   // on_token(id, user_data) per new token
 *   puts(mode_edge_profile_json(s));                                 // latency and memory of that generation
 *   mode_edge_close(s);
 *
 * mode_edge_open, _select and _generate return a status; after an error, mode_edge_last_error() names the problem
 * and its fix (one line, valid until this thread's next call). A session is used from one thread at a time, and
 * not from inside its own callbacks. The option structs are filled by their mode_edge_default_* function first,
 * so that code written for this version keeps its defaults when fields are added. */
#ifndef MODE_EDGE_H
#define MODE_EDGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define MODE_EDGE_API __attribute__((visibility("default")))
#else
#define MODE_EDGE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  MODE_EDGE_OK = 0,
  MODE_EDGE_INTERNAL_ERROR = 1, /* a bug or the environment (onnxruntime failed where it should not) */
  MODE_EDGE_USER_ERROR = 2      /* a problem the caller can fix: bad bundle, missing pack, bad option */
} mode_edge_status;

typedef struct mode_edge_session mode_edge_session;

typedef struct {
  double budget_mb;          /* memory budget for base + experts, by weight bytes on disk; 0: none */
  int threads;               /* intra-op threads of the process's one pool (0: one per physical core); made at the
                                first open, so a later open asking another count is refused */
  int verify;                /* 1: sha256 of every file before loading it (default) */
  const char* ort_library;   /* path to libonnxruntime.so; NULL: $MODE_EDGE_ORT_LIB, else the loader's search */
  const char* trusted_keys;  /* NULL, or public keys the app pins, one per line ("ed25519 BASE64" as in a .pub file
                                from `mode-edge keys generate`, or a .pub file's path): then only packs signed by one
                                of them load (pack.sig checked at every load; an unsigned or foreign pack is left out
                                as a damaged one is, and selecting it is an error). Needs verify = 1. */
} mode_edge_options;

typedef struct {
  const char* experts;       /* "auto" (route on the prompt), "none", comma-separated expert names, or NULL: the
                                experts the last mode_edge_select made active */
  int route_top_k;           /* most experts "auto" picks (>= 1) */
  const char* router;        /* "centroid" (default), "logistic" or "gate" */
  int64_t max_new_tokens;    /* >= 1 */
  double temperature;        /* 0: greedy */
  int64_t top_k;             /* 0: off */
  double top_p;              /* (0, 1]; 1: off */
  uint64_t seed;
  /* NULL, or called before each token is drawn with the logits it is drawn from (vocabulary-size floats, valid
   * during the call) and the generate call's user_data: for an app's own sampling or a parity check. */
  void (*on_logits)(const float* logits, size_t vocab_size, void* user_data);
  /* 1: the prompt is a chat prompt (the bundle's chat template applied: `mode-edge tokenize --chat`, or the
   * manifest's tokenizer.chat.pieces around the messages' ids): stop at the template's end of turn as well as at
   * the end of sequence. An error for a bundle without a chat template. */
  int chat;
  /* NULL, or the ids "auto" routes on instead of the prompt (a chat prompt's user message, so that the template's
   * boilerplate does not decide), n_route_ids of them */
  const int64_t* route_ids;
  size_t n_route_ids;
} mode_edge_generate_options;

/* Called with each new token id; return 0 to stop generating. */
typedef int (*mode_edge_token_callback)(int64_t token, void* user_data);

MODE_EDGE_API void mode_edge_default_options(mode_edge_options* options);
MODE_EDGE_API void mode_edge_default_generate_options(mode_edge_generate_options* options);

/* Opens the bundle folder: checks its manifest and files, loads the base, reads every installed pack's gate. */
MODE_EDGE_API mode_edge_status mode_edge_open(const char* bundle, const mode_edge_options* options, mode_edge_session** session);

/* Makes exactly these experts active (loaded within the budget, least recently used evicted); n = 0: none. A
 * generation with experts NULL runs with them; "auto" or names select anew. */
MODE_EDGE_API mode_edge_status mode_edge_select(mode_edge_session* session, const char* const* experts, size_t n);

/* Generates after the prompt's token ids; stops at max_new_tokens, the bundle's end-of-sequence id, or when the
 * callback returns 0. */
MODE_EDGE_API mode_edge_status mode_edge_generate(mode_edge_session* session, const int64_t* prompt, size_t n_prompt,
                                    const mode_edge_generate_options* options, mode_edge_token_callback on_token,
                                    void* user_data);

/* The last generation's profile as JSON (the Python runtime's schema; memory.peak_rss_mb is the peak since the
 * generation's profile began: each resets the process's peak RSS, /proc/self/clear_refs); owned by the session,
 * valid until its next call. "{}" before the first generation. */
MODE_EDGE_API const char* mode_edge_profile_json(mode_edge_session* session);

MODE_EDGE_API const char* mode_edge_last_error(void);

MODE_EDGE_API void mode_edge_close(mode_edge_session* session);

#ifdef __cplusplus
}
#endif
#endif
