// CPU backend of the fused warped Dice. Forward: the rows of each batch element are cut into fixed chunks (never
// depending on the thread count), each chunk sums into its own [3, K] buffer, and the buffers are added in chunk
// order: bit-identical results for any number of threads, O(N * chunks * K) extra memory. Backward: a gather per
// point for the ddf and target gradients; the probability-source gradient is a scatter in which each thread owns
// whole class planes (n_in, k) and visits the points reading them in a fixed order (no atomics, no extra memory,
// bit-identical for any number of threads).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"
#include "deepatlas/dice.h"
#include "dice_glue.h"

namespace deepatlas {
namespace {

constexpr int64_t kRowsPerChunk = 16;

struct PlainAdd {
  template <typename V>
  void operator()(V* p, V v) const {
    *p += v;
  }
};

template <typename I, typename Coords, typename Source, typename Target>
void forward(const DiceArgs& a, const Coords& coords, const Source& source, const Target& target) {
  const SampleArgs& s = a.sample;
  const I classes = static_cast<I>(a.classes);
  const int64_t rows = s.out_size[0] * s.out_size[1];
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t width = 3 * a.classes;
  std::vector<double> partial(s.batch * chunks * width, 0.0);
  at::parallel_for(0, s.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(width);  // this thread's own buffer: no false sharing between chunks
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, chunk = item % chunks;
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t row = chunk * kRowsPerChunk; row < std::min(rows, (chunk + 1) * kRowsPerChunk); ++row) {
        Point<I> q{static_cast<I>(n), static_cast<I>(row / s.out_size[1]), static_cast<I>(row % s.out_size[1]), 0};
        for (; q.x < s.out_size[2]; ++q.x) {
          warped_dice_point<double>(coords, source, target, q, classes, sums.data(), PlainAdd{});
        }
      }
      std::copy(sums.begin(), sums.end(), partial.begin() + item * width);
    }
  });
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const double* src = partial.data() + (n * chunks + chunk) * width;
      for (int64_t k = 0; k < width; ++k) a.sums[n * width + k] += src[k];
    }
  }
}

// grad_source [N_in, K, D, H, W], zero-initialised. The thread given planes [begin, end) of the N_in * K class
// planes makes one pass over the points reading each source batch element it touches, adding to its own planes
// only. Every cell receives its additions in point order, then corner order, however the planes are split.
template <typename T, typename I, typename Coords, typename Target>
void scatter_source_grad(const DiceArgs& a, const Coords& coords, const Target& target) {
  const SampleArgs& s = a.sample;
  const auto grad_source = make_volume<T, I>(a.grad_source);
  const int64_t in_batch = grad_source.size[0];
  const int64_t classes = a.classes;
  at::parallel_for(0, in_batch * classes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end;) {
      const int64_t n_in = first / classes;
      const int64_t last = std::min(end, (n_in + 1) * classes);
      Volume<T, I> planes = grad_source;
      planes.data = grad_source.data + n_in * grad_source.stride[0];
      planes.size[0] = 1;  // only the points reading n_in are visited below
      const I k_begin = static_cast<I>(first - n_in * classes);
      const I k_end = static_cast<I>(last - n_in * classes);
      const int64_t n_first = in_batch == 1 ? 0 : n_in;
      const int64_t n_last = in_batch == 1 ? s.batch : n_in + 1;
      Point<I> q;
      for (int64_t n = n_first; n < n_last; ++n) {
        q.n = static_cast<I>(n);
        const double* grad_sums = a.grad_sums + n * 3 * classes;
        for (q.z = 0; q.z < s.out_size[0]; ++q.z) {
          for (q.y = 0; q.y < s.out_size[1]; ++q.y) {
            for (q.x = 0; q.x < s.out_size[2]; ++q.x) {
              warped_dice_source_grad_point<double>(coords, target, q, static_cast<I>(classes), grad_sums, planes,
                                                    k_begin, k_end, PlainAdd{});
            }
          }
        }
      }
      first = last;
    }
  });
}

template <typename T, typename I, typename Source, typename Target>
void run(const DiceArgs& a, const Source& source, const Target& target) {
  const SampleArgs& s = a.sample;
  dispatch_coords<T, I>(s, [&](const auto& coords) {
    if (a.grad_sums == nullptr) {
      forward<I>(a, coords, source, target);
      return;
    }
    const auto grad_ddf = make_volume<T, I>(s.grad_coords);     // [N, 3, D, H, W] or absent
    const auto grad_target = make_volume<T, I>(a.grad_target);  // [N, K, D, H, W] or absent
    if (grad_ddf.data != nullptr || grad_target.data != nullptr) {
      const I classes = static_cast<I>(a.classes);
      parallel_over_points<I, Copies::BaselineOnly>(s, [&](const Point<I>& q) {
        warped_dice_backward_point<double>(coords, source, target, q, classes, a.grad_sums + q.n * 3 * a.classes,
                                           grad_ddf, grad_target);
      });
    }
    if constexpr (IsProbSource<Source>::value) {
      if (a.grad_source.data != nullptr) scatter_source_grad<T, I>(a, coords, target);
    }
  });
}

struct CpuDiceRunner {
  static void run_dice(const DiceArgs& a, c10::Device /*device*/) {
    dispatch_dice(a, [&](auto float_tag, auto index_tag, const auto& source, const auto& target) {
      run<typename decltype(float_tag)::type, typename decltype(index_tag)::type>(a, source, target);
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_DICE_OPS(CPU, CpuDiceRunner)

}  // namespace deepatlas
