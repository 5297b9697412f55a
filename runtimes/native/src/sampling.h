// Drawing the next token from the logits, with Hugging Face generate's conventions, step for step as the Python
// runtime (runtimes/engine.sample): greedy at temperature 0 (argmax, the first of equal maxima, as numpy's), else
// softmax weights at the temperature, then top-k, then top-p (the smallest set of likeliest tokens whose mass reaches
// it), and inverse transform sampling over the running sum in index order with a SplitMix64 draw, so a seed samples
// the Python runtime's tokens too (unless logits that differ in their last digits move a draw across a boundary).
#pragma once
#include <cstdint>
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

// SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; Java's SplittableRandom): exact 64-bit integer steps, the same
// draws in both runtimes and on every platform (std::uniform_real_distribution's algorithm is each library's own).
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  double uniform();  // the next draw in [0, 1): the top 53 bits of the next output
};

// One token id from logits (V floats).
int64_t sample(const std::vector<float>& logits, const Sampling& s, SplitMix64& rng);

}  // namespace mode_edge
