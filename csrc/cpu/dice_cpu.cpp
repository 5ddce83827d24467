// CPU backend of the fused warped Dice. Forward: the rows of each batch element are cut into fixed chunks (never
// depending on the thread count), each chunk sums into its own [3, K] buffer, and the buffers are added in chunk
// order: bit-identical results for any number of threads, O(N * chunks * K) extra memory. Backward: a gather per
// point.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"
#include "deepatlas/dice.h"
#include "deepatlas/sample_dispatch.h"
#include "dice_glue.h"

namespace deepatlas {
namespace {

constexpr int64_t kRowsPerChunk = 16;

struct PlainAdd {
  void operator()(double* p, double v) const { *p += v; }
};

template <typename TL, typename T, typename I, typename Target>
void run_with_target(const DiceArgs& a, const Target& target) {
  using acc_t = double;
  const SampleArgs& s = a.sample;
  const auto source = make_volume<const TL, I>(s.input);  // [N_in, 1, D, H, W]
  const I classes = static_cast<I>(a.classes);
  dispatch_coords<T, I>(s, [&](const auto& coords) {
    if (a.grad_sums == nullptr) {
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
            Point<I> q{static_cast<I>(n), static_cast<I>(row / s.out_size[1]), static_cast<I>(row % s.out_size[1]),
                       0};
            for (; q.x < s.out_size[2]; ++q.x) {
              warped_dice_point<acc_t>(coords, source, target, q, classes, sums.data(), PlainAdd{});
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
      return;
    }
    const auto grad_ddf = make_volume<T, I>(s.grad_coords);   // [N, 3, D, H, W] or absent
    const auto grad_target = make_volume<T, I>(a.grad_target);  // [N, K, D, H, W] or absent
    parallel_over_points<I>(s, [&](const Point<I>& q) {
      warped_dice_backward_point<acc_t>(coords, source, target, q, classes, a.grad_sums + q.n * 3 * a.classes,
                                        grad_ddf, grad_target);
    });
  });
}

template <typename TL, typename T, typename I>
void run_typed(const DiceArgs& a) {
  if (a.target_is_labels) {
    run_with_target<TL, T, I>(a, LabelTarget<TL, I>{make_volume<const TL, I>(a.target)});
  } else {
    run_with_target<TL, T, I>(a, ProbTarget<T, I>{make_volume<const T, I>(a.target)});
  }
}

struct CpuDiceRunner {
  static void run_dice(const DiceArgs& a, c10::Device /*device*/) {
    dispatch_label_types(a.sample, [&](auto label_tag, auto float_tag, auto index_tag) {
      run_typed<typename decltype(label_tag)::type, typename decltype(float_tag)::type,
                typename decltype(index_tag)::type>(a);
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_DICE_OPS(CPU, CpuDiceRunner)

}  // namespace deepatlas
