// CPU backend of grid_sample / warp: at::parallel_for over output points, calling the shared per-point code in
// deepatlas/warp.h. The input-gradient scatter is parallel over (batch, channel) planes of the input so that every
// plane is written by one thread in a fixed order: no atomics, bit-identical results for any thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "deepatlas/sample_dispatch.h"
#include "sample_glue.h"

namespace deepatlas {
namespace {

constexpr int64_t kPointGrain = 1024;

struct PlainAdd {
  template <typename T>
  void operator()(T* p, T v) const {
    *p += v;
  }
};

template <typename T, typename I>
void forward_typed(const SampleArgs& a) {
  using acc_t = typename AccType<T>::type;
  const auto input = make_volume<const T, I>(a.input);  // [N_in, C, D, H, W]
  const auto out = make_volume<T, I>(a.output);          // [N, C, D', H', W']
  const I d = static_cast<I>(a.out_size[0]), h = static_cast<I>(a.out_size[1]), w = static_cast<I>(a.out_size[2]);
  dispatch_coords<T, I>(a, [&](const auto& coords) {
    at::parallel_for(0, a.num_points(), kPointGrain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        sample_forward_point<acc_t>(coords, input, out, unravel_point<I>(static_cast<I>(p), d, h, w), a.interp,
                                    a.padding);
      }
    });
  });
}

template <typename T, typename I>
void backward_typed(const SampleArgs& a) {
  using acc_t = typename AccType<T>::type;
  const auto input = make_volume<const T, I>(a.input);     // [N_in, C, D, H, W]
  const auto grad_out = make_volume<const T, I>(a.output);  // [N, C, D', H', W']
  const I d = static_cast<I>(a.out_size[0]), h = static_cast<I>(a.out_size[1]), w = static_cast<I>(a.out_size[2]);
  dispatch_coords<T, I>(a, [&](const auto& coords) {
    if (a.grad_coords.data != nullptr) {
      const auto grad_coords = make_volume<T, I>(a.grad_coords);  // coords' shape
      at::parallel_for(0, a.num_points(), kPointGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          sample_backward_coords_point<acc_t>(coords, input, grad_out, grad_coords,
                                              unravel_point<I>(static_cast<I>(p), d, h, w), a.interp, a.padding);
        }
      });
    }
    if (a.grad_input.data != nullptr) {
      const auto grad_input = make_volume<T, I>(a.grad_input);  // [N_in, C, D, H, W], zero-initialised
      const int64_t in_batch = a.input.size[0];
      const int64_t channels = a.input.size[1];
      const int64_t points_per_batch = a.out_size[0] * a.out_size[1] * a.out_size[2];
      at::parallel_for(0, in_batch * channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n_in = plane / channels;
          const I ch = static_cast<I>(plane % channels);
          // Output batches reading this input plane: all of them when the input broadcasts (N_in = 1).
          const int64_t n_first = in_batch == 1 ? 0 : n_in;
          const int64_t n_last = in_batch == 1 ? a.batch : n_in + 1;
          for (int64_t p = n_first * points_per_batch; p < n_last * points_per_batch; ++p) {
            sample_backward_input_point<acc_t>(coords, grad_out, grad_input,
                                               unravel_point<I>(static_cast<I>(p), d, h, w), ch, I(ch + 1),
                                               a.interp, a.padding, PlainAdd{});
          }
        }
      });
    }
  });
}

struct CpuRunner {
  static void run_forward(const SampleArgs& a, c10::Device /*device*/) {
    dispatch_index(a.index64, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      if (a.input.dtype == DType::Float64) {
        forward_typed<double, I>(a);
      } else {
        forward_typed<float, I>(a);
      }
    });
  }
  static void run_backward(const SampleArgs& a, c10::Device /*device*/) {
    dispatch_index(a.index64, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      if (a.input.dtype == DType::Float64) {
        backward_typed<double, I>(a);
      } else {
        backward_typed<float, I>(a);
      }
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_SAMPLE_OPS(CPU, CpuRunner)

}  // namespace deepatlas
