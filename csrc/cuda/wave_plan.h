// Whole-wave grid planning of the fused CUDA kernels (fused_lse_cuda.cpp).  Pure integer arithmetic, no CUDA
// or torch dependency: tests/test_gpu_static.py compiles it with the host compiler and checks it against
// triton_kernels/_waves.py, the Triton launchers' copy of the same rule.
//
// A grid of `units` CTAs per class split and s splits runs in ceil(units * s / slots) waves on `slots`
// resident CTAs (SMs x CTAs per SM from the occupancy API); the idle share of the last wave is the loss.
// whole_wave_splits searches s in [1, cap] for the least loss (ties: the larger s), with
// cap = min(max(ceil(waves * slots / units), kMinSplitChoices), limit): up to `waves` waves, and at least
// kMinSplitChoices split counts to choose from so that one split's CTAs are a small share of the grid
// (>= 0.92 efficiency for every units <= 2000, slots 100 .. 4 x 132).  Only `limit` (partials' memory, class
// tiles, the grid's 65535) can cost more.  The old plan, ceil(slots / units) splits, launched e.g. 16 x 17 =
// 272 CTAs for 264 slots: a second wave of 8.
#pragma once

#include <algorithm>
#include <cstdint>

namespace marginops {
namespace cuda {

constexpr int64_t kMinSplitChoices = 16;

inline int64_t whole_wave_splits(int64_t units, int64_t slots, int64_t waves, int64_t limit) {
  units = std::max<int64_t>(1, units);
  slots = std::max<int64_t>(1, slots);
  const int64_t by_waves = (waves * slots + units - 1) / units;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(by_waves, kMinSplitChoices), limit));
  int64_t best = 1, best_idle = -1, best_waves = 1;
  for (int64_t s = 1; s <= cap; ++s) {
    const int64_t ctas = units * s;
    const int64_t n_waves = (ctas + slots - 1) / slots;
    const int64_t idle = n_waves * slots - ctas;
    // idle / n_waves <= best_idle / best_waves, without division
    if (best_idle < 0 || idle * best_waves <= best_idle * n_waves) {
      best = s;
      best_idle = idle;
      best_waves = n_waves;
    }
  }
  return best;
}

}  // namespace cuda
}  // namespace marginops
