// CPU backend of grid_sample / warp: at::parallel_for over output points, calling the shared per-point code in
// deepatlas/warp.h. The input-gradient scatter needs no atomics and is bit-identical for any thread count (see
// scatter_input_grad).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
#include "deepatlas/sample_dispatch.h"
#include "sample_glue.h"

namespace deepatlas {
namespace {

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
  dispatch_modes(a.interp, a.padding, [&](auto interp, auto padding) {
    dispatch_coords<T, I>(a, [&](const auto& coords) {
      parallel_over_points<I>(a, [&](const Point<I>& q) {
        sample_forward_point<acc_t>(coords, input, out, q, interp(), padding());
      });
    });
  });
}

// The input-gradient scatter, parallel over input planes (n_in, c): each plane is written by one thread, visiting
// the output points that read it in a fixed order. No atomics, no extra memory, and bit-identical results for any
// number of threads. (A single plane, N = C = 1, is scattered by one thread.)
template <typename T, typename I, typename Coords>
void scatter_input_grad(const SampleArgs& a, const Coords& coords, const Volume<const T, I>& grad_out,
                        const Volume<T, I>& grad_input,  // [N_in, C, D, H, W], zero-initialised
                        Interp interp, Padding padding) {
  using acc_t = typename AccType<T>::type;
  const int64_t in_batch = grad_input.size[0];
  const int64_t channels = grad_input.size[1];
  at::parallel_for(0, in_batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n_in = plane / channels;
      const I ch = static_cast<I>(plane % channels);
      Volume<T, I> target = grad_input;
      target.data = grad_input.data + n_in * grad_input.stride[0];
      target.size[0] = 1;  // only the points reading n_in are visited below
      // Output batches reading this input plane: all of them when the input broadcasts (N_in = 1).
      const int64_t n_first = in_batch == 1 ? 0 : n_in;
      const int64_t n_last = in_batch == 1 ? a.batch : n_in + 1;
      Point<I> q;
      for (int64_t n = n_first; n < n_last; ++n) {
        q.n = static_cast<I>(n);
        for (q.z = 0; q.z < a.out_size[0]; ++q.z) {
          for (q.y = 0; q.y < a.out_size[1]; ++q.y) {
            for (q.x = 0; q.x < a.out_size[2]; ++q.x) {
              sample_backward_input_point<acc_t>(coords, grad_out, target, q, ch, I(ch + 1), interp, padding,
                                                 PlainAdd{});
            }
          }
        }
      }
    }
  });
}

template <typename T, typename I>
void backward_typed(const SampleArgs& a) {
  using acc_t = typename AccType<T>::type;
  const auto input = make_volume<const T, I>(a.input);     // [N_in, C, D, H, W]
  const auto grad_out = make_volume<const T, I>(a.output);  // [N, C, D', H', W']
  dispatch_modes(a.interp, a.padding, [&](auto interp, auto padding) {
    dispatch_coords<T, I>(a, [&](const auto& coords) {
      if (a.grad_coords.data != nullptr) {
        const auto grad_coords = make_volume<T, I>(a.grad_coords);  // coords' shape
        parallel_over_points<I>(a, [&](const Point<I>& q) {
          sample_backward_coords_point<acc_t>(coords, input, grad_out, grad_coords, q, interp(), padding());
        });
      }
      if (a.grad_input.data != nullptr) {
        scatter_input_grad<T, I>(a, coords, grad_out, make_volume<T, I>(a.grad_input), interp(), padding());
      }
    });
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
