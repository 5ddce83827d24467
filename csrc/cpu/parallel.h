// The CPU loop over output points shared by every CPU op.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/isa.h"
#include "deepatlas/sample_args.h"
#include "deepatlas/volume.h"

// On a lambda: inline everything it calls (g++ and clang).
#if defined(__GNUC__)
#define DA_FLATTEN __attribute__((flatten))
#else
#define DA_FLATTEN
#endif

namespace deepatlas {

constexpr int64_t kPointGrain = 2048;

// Which copies of a flattened loop are compiled (cpu/isa.h): the baseline and an AVX2 one chosen at run time, or
// the baseline only, for loops whose AVX2 copy measured no faster (the soft label warp and warped Dice).
enum class Copies { WithAvx2, BaselineOnly };

// at::parallel_for(begin, end, grain, loop) with `loop` flattened into the task: loop and everything it calls are
// inlined into one function, compiled once per copy.
template <Copies kCopies = Copies::WithAvx2, typename Loop>
inline void parallel_for_flattened(int64_t begin, int64_t end, int64_t grain, const Loop& loop) {
#ifdef DA_CPU_AVX2_COPIES
  if constexpr (kCopies == Copies::WithAvx2) {
    if (use_avx2_loops()) {
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) DA_FLATTEN DA_TARGET_AVX2 { loop(b, e); });
      return;
    }
  }
#endif
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) DA_FLATTEN { loop(b, e); });
}

// fn(point) for every output point, in parallel over rows (n, z, y) so that no point index is divided. The row
// loop is flattened: fn and the per-point code it calls are inlined into it, whatever g++'s unit-growth limits
// decide for a library with many instantiations (a call per point with its arguments reloaded from memory made
// the loops up to 2x slower).
template <typename I, Copies kCopies = Copies::WithAvx2, typename F>
inline void parallel_over_points(const SampleArgs& a, const F& fn) {
  const I d = static_cast<I>(a.out_size[0]), h = static_cast<I>(a.out_size[1]), w = static_cast<I>(a.out_size[2]);
  const int64_t rows = a.batch * a.out_size[0] * a.out_size[1];
  const int64_t row_grain = std::max<int64_t>(1, kPointGrain / std::max<int64_t>(1, w));
  parallel_for_flattened<kCopies>(0, rows, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      Point<I> q{static_cast<I>(row / (int64_t(d) * h)), static_cast<I>((row / h) % d), static_cast<I>(row % h), 0};
      for (; q.x < w; ++q.x) fn(q);
    }
  });
}

// fn(first point of the row, row length) for every row (n, z, y) of output points, in parallel over rows: for loops
// that process a row in chunks (cpu/sample_rows.h).
template <typename I, typename F>
inline void parallel_over_rows(const SampleArgs& a, const F& fn) {
  const I d = static_cast<I>(a.out_size[0]), h = static_cast<I>(a.out_size[1]), w = static_cast<I>(a.out_size[2]);
  const int64_t rows = a.batch * a.out_size[0] * a.out_size[1];
  const int64_t row_grain = std::max<int64_t>(1, kPointGrain / std::max<int64_t>(1, w));
  parallel_for_flattened(0, rows, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Point<I> first{static_cast<I>(row / (int64_t(d) * h)), static_cast<I>((row / h) % d),
                           static_cast<I>(row % h), 0};
      fn(first, w);
    }
  });
}

}  // namespace deepatlas
