// CUDA backend of grid_sample / warp: grid-stride kernels over output points calling the shared per-point code
// in deepatlas/warp.h. The input gradient is a scatter with atomicAdd into a float32 (or float64) buffer, or, under
// torch.use_deterministic_algorithms(True), (index, value) pairs that the glue sums deterministically.
#include <cuda_runtime.h>

#include <algorithm>

#include "deepatlas/sample_dispatch.h"
#include "sample_launch.h"

namespace deepatlas {
namespace {

constexpr int kThreads = 256;

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* p, T v) const {
    atomicAdd(p, v);
  }
};

template <typename I>
struct OutShape {
  I d, h, w;
  int64_t points;
};

template <typename acc_t, typename Coords, typename TIn, typename I>
__global__ void forward_kernel(Coords coords, Volume<const TIn, I> input, Volume<TIn, I> out, OutShape<I> shape,
                               Interp interp, Padding padding) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < shape.points;
       p += int64_t(blockDim.x) * gridDim.x) {
    sample_forward_point<acc_t>(coords, input, out, unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w),
                                interp, padding);
  }
}

template <typename acc_t, typename Coords, typename TIn, typename TC, typename TAcc, typename I>
__global__ void backward_kernel(Coords coords, Volume<const TIn, I> input, Volume<const TIn, I> grad_out,
                                Volume<TC, I> grad_coords, Volume<TAcc, I> grad_input, OutShape<I> shape,
                                Interp interp, Padding padding) {
  const I channels = input.size[1];
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < shape.points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w);
    if (grad_coords.data != nullptr) {
      sample_backward_coords_point<acc_t>(coords, input, grad_out, grad_coords, q, interp, padding);
    }
    if (grad_input.data != nullptr) {
      sample_backward_input_point<acc_t>(coords, grad_out, grad_input, q, I(0), channels, interp, padding,
                                         AtomicAdd{});
    }
  }
}

template <typename acc_t, typename Coords, typename TIn, typename TAcc, typename I>
__global__ void backward_pairs_kernel(Coords coords, Volume<const TIn, I> grad_out, Volume<TAcc, I> grad_input,
                                      OutShape<I> shape, Interp interp, Padding padding, PairScatterArgs pairs) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < shape.points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w);
    sample_backward_pairs_point<acc_t>(coords, grad_out, grad_input, q, p, interp, padding, pairs);
  }
}

int num_blocks(int64_t points) {
  const int64_t needed = (points + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(needed, 1), 65535 * 8));
}

template <typename I>
OutShape<I> out_shape(const SampleArgs& a) {
  return {static_cast<I>(a.out_size[0]), static_cast<I>(a.out_size[1]), static_cast<I>(a.out_size[2]),
          a.num_points()};
}

template <typename TIn, typename TC>
void forward_typed(const SampleArgs& a, cudaStream_t stream) {
  using acc_t = typename CommonAcc<TIn, TC>::type;
  dispatch_index(a.index64, [&](auto index_tag) {
    using I = typename decltype(index_tag)::type;
    dispatch_coords<TC, I>(a, [&](const auto& coords) {
      forward_kernel<acc_t><<<num_blocks(a.num_points()), kThreads, 0, stream>>>(
          coords, make_volume<const TIn, I>(a.input), make_volume<TIn, I>(a.output), out_shape<I>(a), a.interp,
          a.padding);
    });
  });
}

template <typename TIn, typename TC>
void backward_typed(const SampleArgs& a, cudaStream_t stream) {
  using acc_t = typename CommonAcc<TIn, TC>::type;
  using TAcc = acc_t;  // accumulation buffer of the input gradient
  dispatch_index(a.index64, [&](auto index_tag) {
    using I = typename decltype(index_tag)::type;
    dispatch_coords<TC, I>(a, [&](const auto& coords) {
      backward_kernel<acc_t><<<num_blocks(a.num_points()), kThreads, 0, stream>>>(
          coords, make_volume<const TIn, I>(a.input), make_volume<const TIn, I>(a.output),
          make_volume<TC, I>(a.grad_coords), make_volume<TAcc, I>(a.grad_input), out_shape<I>(a), a.interp,
          a.padding);
    });
  });
}

template <typename TIn, typename TC>
void backward_pairs_typed(const PairScatterArgs& pairs, cudaStream_t stream) {
  using acc_t = typename CommonAcc<TIn, TC>::type;
  using TAcc = acc_t;
  const SampleArgs& a = pairs.sample;
  dispatch_index(a.index64, [&](auto index_tag) {
    using I = typename decltype(index_tag)::type;
    dispatch_coords<TC, I>(a, [&](const auto& coords) {
      backward_pairs_kernel<acc_t><<<num_blocks(a.num_points()), kThreads, 0, stream>>>(
          coords, make_volume<const TIn, I>(a.output), make_volume<TAcc, I>(a.grad_input), out_shape<I>(a),
          a.interp, a.padding, pairs);
    });
  });
}

// f(TypeTag<TIn>, TypeTag<TC>) for the supported pairs: both float64, or any mix of float16/bfloat16/float32.
template <typename F>
void dispatch_dtypes(DType input, DType coords, F&& f) {
  auto with_coords = [&](auto in_tag) {
    switch (coords) {
      case DType::Float16:
        f(in_tag, TypeTag<__half>{});
        break;
      case DType::BFloat16:
        f(in_tag, TypeTag<__nv_bfloat16>{});
        break;
      default:
        f(in_tag, TypeTag<float>{});
        break;
    }
  };
  switch (input) {
    case DType::Float64:
      f(TypeTag<double>{}, TypeTag<double>{});
      break;
    case DType::Float16:
      with_coords(TypeTag<__half>{});
      break;
    case DType::BFloat16:
      with_coords(TypeTag<__nv_bfloat16>{});
      break;
    default:
      with_coords(TypeTag<float>{});
      break;
  }
}

}  // namespace

cudaError_t launch_sample_forward(const SampleArgs& args, cudaStream_t stream) {
  dispatch_dtypes(args.input.dtype, args.coords.dtype, [&](auto in_tag, auto coords_tag) {
    forward_typed<typename decltype(in_tag)::type, typename decltype(coords_tag)::type>(args, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_sample_backward(const SampleArgs& args, cudaStream_t stream) {
  dispatch_dtypes(args.input.dtype, args.coords.dtype, [&](auto in_tag, auto coords_tag) {
    backward_typed<typename decltype(in_tag)::type, typename decltype(coords_tag)::type>(args, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_sample_backward_pairs(const PairScatterArgs& args, cudaStream_t stream) {
  dispatch_dtypes(args.sample.input.dtype, args.sample.coords.dtype, [&](auto in_tag, auto coords_tag) {
    backward_pairs_typed<typename decltype(in_tag)::type, typename decltype(coords_tag)::type>(args, stream);
  });
  return cudaGetLastError();
}

}  // namespace deepatlas
