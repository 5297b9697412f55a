// Drawing the next token from the logits, with Hugging Face generate's conventions (runtimes/engine.sample): greedy
// at temperature 0 (argmax, the first of equal maxima, as numpy's), else softmax at the temperature, then top-k, then
// top-p (the smallest set of likeliest tokens whose mass reaches it), drawn with a seeded std::mt19937_64 (the same draws on every platform). Greedy
// picks the Python runtime's tokens; sampled ones follow another random stream than numpy's for the same seed.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace mode_edge {

struct Sampling {
  double temperature = 0.0;  // >= 0; 0: greedy
  int64_t top_k = 0;         // 0: off; k >= vocabulary keeps all
  double top_p = 1.0;        // (0, 1]; 1: off
  uint64_t seed = 0;
};

// Throws UserError for a value out of range, naming the option.
void check_sampling(const Sampling& s);

// One token id from logits (V floats).
int64_t sample(const std::vector<float>& logits, const Sampling& s, std::mt19937_64& rng);

}  // namespace mode_edge
