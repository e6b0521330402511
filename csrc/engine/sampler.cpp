#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace moa::engine {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

using Candidate = std::pair<float, int32_t>;

// Higher probability first; ties by lower id, so results never depend on sort stability.
bool before(const Candidate& a, const Candidate& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

Rng::Rng(uint64_t seed) {
  for (auto& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

int64_t Sampler::sample(const float* logits, int64_t V, const SamplingParams& p, Rng& rng) {
  if (p.temperature <= 0.0f) return std::max_element(logits, logits + V) - logits;

  // Candidates: (unnormalised probability, id), exp computed once per token. They are
  // sorted best first only as far as needed: the top-k, or as many as the nucleus needs
  // (a widening partial sort, so a typical step sorts a few dozen, not V).
  const float inv_t = 1.0f / p.temperature;
  const float top = *std::max_element(logits, logits + V);
  candidates_.resize(V);
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    const float e = std::exp((logits[i] - top) * inv_t);
    candidates_[i] = {e, static_cast<int32_t>(i)};
    total += e;
  }
  const bool cut_k = p.top_k > 0 && p.top_k < V;  // top_k >= V cuts nothing, like 0
  int64_t keep = cut_k ? p.top_k : V;
  int64_t sorted = std::min<int64_t>(keep, 64);
  std::partial_sort(candidates_.begin(), candidates_.begin() + sorted, candidates_.end(), before);
  if (cut_k) {
    if (sorted < keep) {
      std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), before);
      sorted = keep;
    }
    total = 0.0;
    for (int64_t i = 0; i < keep; ++i) total += candidates_[i].first;
  }
  if (p.top_p < 1.0f) {
    // Smallest prefix whose probability reaches top_p (at least one token).
    double cum = 0.0;
    int64_t i = 0;
    while (true) {
      for (; i < sorted; ++i) {
        cum += candidates_[i].first / total;
        if (cum >= p.top_p) break;
      }
      if (i < sorted || sorted == keep) break;
      const int64_t wider = std::min<int64_t>(keep, sorted * 4);
      std::partial_sort(candidates_.begin() + sorted, candidates_.begin() + wider, candidates_.end(), before);
      sorted = wider;
    }
    keep = std::min<int64_t>(keep, i + 1);
  }
  double mass = 0.0;
  for (int64_t i = 0; i < keep; ++i) mass += candidates_[i].first;
  double u = rng.uniform() * mass;
  for (int64_t i = 0; i < keep; ++i) {
    u -= candidates_[i].first;
    if (u < 0.0) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

}  // namespace moa::engine
