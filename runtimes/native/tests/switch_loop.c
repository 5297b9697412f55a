/* Switches between two experts N times through the C API (in C: it also checks that mode_edge.h is plain C), one
 * short greedy generation each, and prints one JSON line: the tokens of the first generation with each expert, how
 * many generations loaded their expert (with a budget that holds one expert, every switch evicts and reloads), and
 * the RSS after the first 10% of the switches and at the end (kB), for the leak check of tests/runtimes/test_native.py.
 *   usage: switch_loop BUNDLE BUDGET_MB N EXPERT_A EXPERT_B   (onnxruntime from $MODE_EDGE_ORT_LIB) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mode_edge.h"

static long rss_kb(void) {
  char line[256];
  long kb = -1;
  FILE* f = fopen("/proc/self/status", "r");
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmRSS:", 6) == 0) kb = strtol(line + 6, NULL, 10);
  if (f) fclose(f);
  return kb;
}

typedef struct {
  long long ids[8];
  int n;
} tokens;

static int keep(int64_t token, void* user) {
  tokens* t = (tokens*)user;
  if (t->n < 8) t->ids[t->n++] = token;
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: switch_loop BUNDLE BUDGET_MB N EXPERT_A EXPERT_B\n");
    return 2;
  }
  mode_edge_options o;
  mode_edge_default_options(&o);
  o.budget_mb = atof(argv[2]);
  o.threads = 1;
  mode_edge_session* s;
  if (mode_edge_open(argv[1], &o, &s) != MODE_EDGE_OK) {
    fprintf(stderr, "error: %s\n", mode_edge_last_error());
    return 2;
  }
  int n = atoi(argv[3]), loads = 0;
  long rss_warm = -1;
  const int64_t prompt[] = {5, 17, 42, 99};
  mode_edge_generate_options g;
  mode_edge_default_generate_options(&g);
  g.max_new_tokens = 4;
  tokens first[2] = {{{0}, 0}, {{0}, 0}};
  for (int i = 0; i < n; i++) {
    const char* name = argv[4 + i % 2];
    char key[80];
    tokens t = {{0}, 0};
    g.experts = NULL; /* the selection's experts */
    if (mode_edge_select(s, &name, 1) != MODE_EDGE_OK ||
        mode_edge_generate(s, prompt, 4, &g, keep, &t) != MODE_EDGE_OK) {
      fprintf(stderr, "error: %s\n", mode_edge_last_error());
      return 2;
    }
    snprintf(key, sizeof key, "\"expert %s\"", name);
    loads += strstr(mode_edge_profile_json(s), key) != NULL;  /* this generation's load_s lists the expert */
    if (i < 2) first[i] = t;
    if (i + 1 == n / 10) rss_warm = rss_kb();
  }
  printf("{\"tokens\": [[");
  for (int e = 0; e < 2; e++)
    for (int j = 0; j < first[e].n; j++) printf("%s%lld", j ? ", " : (e ? "], [" : ""), first[e].ids[j]);
  printf("]], \"loads\": %d, \"rss_warm_kb\": %ld, \"rss_end_kb\": %ld}\n", loads, rss_warm, rss_kb());
  mode_edge_close(s);
  return 0;
}
