// CPU backend of grid_sample / warp: at::parallel_for over output points, calling the shared per-point code in
// deepatlas/warp.h. The input-gradient scatter needs no atomics and is bit-identical for any thread count (see
// scatter_input_grad).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// Deterministic parallel scatter of the input gradient. The output slabs (n, z') that read input batch n_in are cut
// into at most kScatterChunks chunks; each chunk scatters into a private buffer covering only the input z-slices
// it touches, then the buffers are summed slice by slice in chunk order. The chunking depends on the data, never
// on the thread count, so the result is bit-identical for any number of threads. When the chunks' slices would
// add up to more than kMaxBufferedVolumes input volumes (wild fields), each input batch is scattered serially.
constexpr int64_t kScatterChunks = 8;
constexpr int64_t kMaxBufferedVolumes = 2;

template <typename T, typename I, typename Coords>
void scatter_input_grad(const SampleArgs& a, const Coords& coords, const Volume<const T, I>& grad_out,
                        const Volume<T, I>& grad_input,  // [N_in, C, D, H, W], contiguous, zero-initialised
                        Interp interp, Padding padding) {
  using acc_t = typename AccType<T>::type;
  const int64_t in_batch = grad_input.size[0];
  const int64_t channels = grad_input.size[1];
  const int64_t depth = grad_input.size[2];
  const int64_t slice = int64_t(grad_input.size[3]) * grad_input.size[4];
  const SpatialGeometry<T, I> geo(grad_input);
  const int64_t out_d = a.out_size[0], out_h = a.out_size[1], out_w = a.out_size[2];
  // Output slabs (n, z') reading input batch n_in: all batches when the input broadcasts.
  const int64_t batches_per_input = in_batch == 1 ? a.batch : 1;
  const int64_t slabs = batches_per_input * out_d;
  const int64_t chunks = std::min(kScatterChunks, slabs);

  auto for_each_point = [&](int64_t n_in, int64_t chunk, int64_t num_chunks, const auto& fn) {
    const int64_t first_batch = in_batch == 1 ? 0 : n_in;
    for (int64_t slab = chunk * slabs / num_chunks; slab < (chunk + 1) * slabs / num_chunks; ++slab) {
      Point<I> q{static_cast<I>(first_batch + slab / out_d), static_cast<I>(slab % out_d), 0, 0};
      for (q.y = 0; q.y < out_h; ++q.y) {
        for (q.x = 0; q.x < out_w; ++q.x) fn(q);
      }
    }
  };
  auto scatter_chunk = [&](const Volume<T, I>& target, int64_t n_in, int64_t chunk, int64_t num_chunks) {
    for_each_point(n_in, chunk, num_chunks, [&](const Point<I>& q) {
      sample_backward_input_point<acc_t>(coords, grad_out, target, q, I(0), static_cast<I>(channels), interp,
                                         padding, PlainAdd{});
    });
  };

  // Pass 1: the input z-range each (n_in, chunk) writes.
  const int64_t items = in_batch * chunks;
  std::vector<int64_t> first(items), last(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      I lo = static_cast<I>(depth), hi = -1;
      for_each_point(item / chunks, item % chunks, chunks, [&](const Point<I>& q) {
        I f, l;
        sample_input_z_range<acc_t>(coords, geo.size, geo.stride, q, interp, padding, &f, &l);
        lo = f < lo ? f : lo;
        hi = l > hi ? l : hi;
      });
      first[item] = lo;
      last[item] = hi;
    }
  });
  int64_t buffered_slices = 0;
  for (int64_t item = 0; item < items; ++item) buffered_slices += std::max<int64_t>(0, last[item] - first[item] + 1);

  if (chunks == 1 || buffered_slices > kMaxBufferedVolumes * in_batch * depth) {
    at::parallel_for(0, in_batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n_in = begin; n_in < end; ++n_in) {
        Volume<T, I> target = grad_input;
        target.data = grad_input.data + n_in * grad_input.stride[0];
        target.size[0] = 1;  // only points reading n_in are visited
        scatter_chunk(target, n_in, 0, 1);
      }
    });
    return;
  }

  // Pass 2: each chunk scatters into its own buffer [C, last - first + 1, H, W].
  std::vector<std::vector<T>> buffers(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slices = last[item] - first[item] + 1;
      if (slices <= 0) continue;
      buffers[item].assign(channels * slices * slice, T(0));
      Volume<T, I> target = grad_input;
      target.size[0] = 1;
      target.stride[0] = static_cast<I>(channels * slices * slice);
      target.stride[1] = static_cast<I>(slices * slice);
      // Indexing with absolute z: the view starts `first` slices before the buffer; only z >= first is touched.
      target.data = buffers[item].data() - first[item] * slice;
      scatter_chunk(target, item / chunks, item % chunks, chunks);
    }
  });

  // Pass 3: sum the buffers into grad_input, slice by slice, in chunk order.
  at::parallel_for(0, in_batch * channels * depth, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t z = index % depth, ch = (index / depth) % channels, n_in = index / (depth * channels);
      T* dst = grad_input.data + n_in * grad_input.stride[0] + ch * grad_input.stride[1] + z * slice;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t item = n_in * chunks + chunk;
        if (z < first[item] || z > last[item]) continue;
        const int64_t slices = last[item] - first[item] + 1;
        const T* src = buffers[item].data() + (ch * slices + (z - first[item])) * slice;
        for (int64_t i = 0; i < slice; ++i) dst[i] += src[i];
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
