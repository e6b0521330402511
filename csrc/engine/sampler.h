// Next-token sampling: greedy, or temperature, then top-k, then top-p (the order of
// transformers' logits warpers), with a per-request random stream.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "moa/engine.h"

namespace moa::engine {

// xoshiro256** seeded through splitmix64: small, fast, and the same stream on every
// platform for a given seed.
class Rng {
 public:
  explicit Rng(uint64_t seed = 0);
  uint64_t next();
  double uniform();  // [0, 1)

 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  // logits: [V] float32. Greedy (temperature 0) takes the first maximum, as argmax does.
  int64_t sample(const float* logits, int64_t V, const SamplingParams& params, Rng& rng);

 private:
  std::vector<std::pair<float, int32_t>> candidates_;  // scratch: (exp(logit - max), id)
};

}  // namespace moa::engine
