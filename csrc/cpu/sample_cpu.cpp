// CPU backend of grid_sample / warp: at::parallel_for over output points, calling the shared per-point code in
// deepatlas/warp.h. The input-gradient scatter needs no atomics and is bit-identical for any thread count (see
// scatter_input_grad).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/sample_rows.h"
#include "deepatlas/sample_dispatch.h"
#include "sample_glue.h"

namespace deepatlas {
namespace {

// Adds only into [begin, end): the input z-planes a scatter task owns.
template <typename T>
struct OwnedAdd {
  T* begin;
  T* end;
  void operator()(T* p, T v) const {
    if (p >= begin && p < end) *p += v;
  }
};

// Trilinear sampling runs the row loops of cpu/sample_rows.h, unless DEEPATLAS_CPU_PER_POINT=1 asks for the
// per-point functions that CUDA runs (so that the tests can check the two are bit-identical).
bool use_row_loops(Interp interp) {
  const char* v = std::getenv("DEEPATLAS_CPU_PER_POINT");
  return interp == Interp::Bilinear && !(v != nullptr && v[0] == '1');
}

template <typename T, typename I>
void forward_typed(const SampleArgs& a) {
  using acc_t = typename AccType<T>::type;
  const auto input = make_volume<const T, I>(a.input);  // [N_in, C, D, H, W]
  const auto out = make_volume<T, I>(a.output);          // [N, C, D', H', W']
  const bool rows = use_row_loops(a.interp);
  dispatch_modes(a.interp, a.padding, [&](auto interp, auto padding) {
    dispatch_coords<T, I>(a, [&](const auto& coords) {
      if (rows) {
        parallel_over_rows<I>(a, [&](const Point<I>& q, I width) {
          sample_forward_row<acc_t>(coords, input, out, q, width, padding);
        });
        return;
      }
      parallel_over_points<I>(a, [&](const Point<I>& q) {
        sample_forward_point<acc_t>(coords, input, out, q, interp(), padding());
      });
    });
  });
}

// For each output plane (n, z'): the lowest and highest input z-plane its points can write to in the scatter
// (the lower trilinear corner's plane and the one above it; nearest rounds to one of the two). [N * D'] pairs.
template <typename T, typename I, typename Coords>
std::vector<std::pair<int32_t, int32_t>> touched_input_planes(const SampleArgs& a, const Coords& coords,
                                                              const I in_size[3], Padding padding) {
  using acc_t = typename AccType<T>::type;
  std::vector<std::pair<int32_t, int32_t>> range(a.batch * a.out_size[0]);
  parallel_for_flattened(0, static_cast<int64_t>(range.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      int32_t lo = INT32_MAX;
      int32_t hi = INT32_MIN;
      Point<I> q{static_cast<I>(plane / a.out_size[0]), static_cast<I>(plane % a.out_size[0]), 0, 0};
      for (q.y = 0; q.y < a.out_size[1]; ++q.y) {
        for (q.x = 0; q.x < a.out_size[2]; ++q.x) {
          const Location<acc_t, I> loc = locate<acc_t>(coords, q, in_size, padding);
          const int32_t z = static_cast<int32_t>(da_floor_bounded(loc.c[0]));  // |c| <= 2^30 after padding
          lo = std::min(lo, z);
          hi = std::max(hi, z + 1);
        }
      }
      range[plane] = {lo, hi};
    }
  });
  return range;
}

// The input-gradient scatter without atomics. Tasks own (input plane (n_in, c), block of input z-planes) and
// visit, in increasing order, the output points that can write into their block, keeping only those writes.
// Every input voxel therefore receives its contributions in increasing output-point order, whatever the number
// of tasks or threads: the result is bit-identical for any thread count. With few input planes (N = C = 1) the
// z-blocks spread the work over the threads; a smooth displacement sends each output plane to one or two blocks.
template <typename T, typename I, typename Coords, typename InterpC, typename PadC>
void scatter_input_grad(const SampleArgs& a, const Coords& coords, const Volume<const T, I>& grad_out,
                        const Volume<T, I>& grad_input,  // [N_in, C, D, H, W], zero-initialised, contiguous
                        InterpC interp, PadC padding) {
  using acc_t = typename AccType<T>::type;
  const SpatialGeometry<T, I> geo(grad_input);
  const int64_t in_batch = grad_input.size[0];
  const int64_t channels = grad_input.size[1];
  const int64_t planes = in_batch * channels;
  const int64_t depth = grad_input.size[2];
  const int64_t blocks = std::clamp<int64_t>((at::get_num_threads() + planes - 1) / planes, 1, depth);
  std::vector<std::pair<int32_t, int32_t>> touched;
  if (blocks > 1) touched = touched_input_planes<T, I>(a, coords, geo.size, padding);
  const bool rows = use_row_loops(interp);
  parallel_for_flattened(0, planes * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / blocks;
      const int64_t block = task % blocks;
      const int64_t n_in = plane / channels;
      const I ch = static_cast<I>(plane % channels);
      const int64_t z_begin = block * depth / blocks;
      const int64_t z_end = (block + 1) * depth / blocks;
      Volume<T, I> target = grad_input;
      target.data = grad_input.data + n_in * grad_input.stride[0];
      target.size[0] = 1;  // only the points reading n_in are visited below
      T* channel_plane = target.data + ch * grad_input.stride[1];
      const OwnedAdd<T> add{channel_plane + z_begin * geo.stride[0], channel_plane + z_end * geo.stride[0]};
      // Output batches reading this input plane: all of them when the input broadcasts (N_in = 1).
      const int64_t n_first = in_batch == 1 ? 0 : n_in;
      const int64_t n_last = in_batch == 1 ? a.batch : n_in + 1;
      Point<I> q;
      for (int64_t n = n_first; n < n_last; ++n) {
        q.n = static_cast<I>(n);
        for (q.z = 0; q.z < a.out_size[0]; ++q.z) {
          if (blocks > 1) {
            const auto& r = touched[n * a.out_size[0] + q.z];
            if (r.second < z_begin || r.first >= z_end) continue;
          }
          for (q.y = 0; q.y < a.out_size[1]; ++q.y) {
            if (rows) {
              q.x = 0;
              sample_backward_input_row<acc_t>(coords, grad_out, target, q, static_cast<I>(a.out_size[2]), ch,
                                               padding, add);
              continue;
            }
            for (q.x = 0; q.x < a.out_size[2]; ++q.x) {
              sample_backward_input_point<acc_t>(coords, grad_out, target, q, ch, I(ch + 1), interp, padding, add);
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
        if (use_row_loops(a.interp)) {
          parallel_over_rows<I>(a, [&](const Point<I>& q, I width) {
            sample_backward_coords_row<acc_t>(coords, input, grad_out, grad_coords, q, width, padding);
          });
        } else {
          parallel_over_points<I>(a, [&](const Point<I>& q) {
            sample_backward_coords_point<acc_t>(coords, input, grad_out, grad_coords, q, interp(), padding());
          });
        }
      }
      if (a.grad_input.data != nullptr) {
        scatter_input_grad<T, I>(a, coords, grad_out, make_volume<T, I>(a.grad_input), interp, padding);
      }
    });
  });
}

// The input gradient as pairs (deepatlas/pair_scatter.h); on the CPU only when DEEPATLAS_FORCE_PAIR_SCATTER=1, to
// test the path that CUDA takes under torch.use_deterministic_algorithms(True).
template <typename T, typename I>
void backward_pairs_typed(const PairScatterArgs& pairs) {
  using acc_t = typename AccType<T>::type;
  const SampleArgs& a = pairs.sample;
  const auto grad_out = make_volume<const T, I>(a.output);      // [N, C, D', H', W']
  const auto grad_input = make_volume<T, I>(a.grad_input);      // [N_in, C, D, H, W]
  dispatch_modes(a.interp, a.padding, [&](auto interp, auto padding) {
    dispatch_coords<T, I>(a, [&](const auto& coords) {
      parallel_over_points<I>(a, [&](const Point<I>& q) {
        const int64_t p = ((int64_t(q.n) * a.out_size[0] + q.z) * a.out_size[1] + q.y) * a.out_size[2] + q.x;
        sample_backward_pairs_point<acc_t>(coords, grad_out, grad_input, q, p, interp(), padding(), pairs);
      });
    });
  });
}

struct CpuRunner {
  static constexpr bool kAtomicScatter = false;
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
  static void run_backward_pairs(const PairScatterArgs& pairs, c10::Device /*device*/) {
    dispatch_index(pairs.sample.index64, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      if (pairs.sample.input.dtype == DType::Float64) {
        backward_pairs_typed<double, I>(pairs);
      } else {
        backward_pairs_typed<float, I>(pairs);
      }
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_SAMPLE_OPS(CPU, CpuRunner)

}  // namespace deepatlas
