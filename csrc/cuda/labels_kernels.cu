// CUDA backend of the label warps: grid-stride kernels over output points -> deepatlas/labels.h.
#include <cuda_runtime.h>

#include <algorithm>

#include "deepatlas/labels.h"
#include "deepatlas/sample_dispatch.h"
#include "labels_launch.h"

namespace deepatlas {
namespace {

constexpr int kThreads = 256;

template <typename I>
struct Shape {
  I d, h, w;
  int64_t points;
};

template <typename acc_t, typename Coords, typename TL, typename T, typename I>
__global__ void labels_kernel(Coords coords, Volume<const TL, I> labels, Volume<TL, I> nearest_out,
                              Volume<T, I> soft_out, Volume<const T, I> grad_out, Volume<T, I> grad_ddf,
                              Shape<I> shape, LabelOp op, TL fill) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < shape.points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w);
    if (op == LabelOp::Nearest) {
      warp_labels_nearest_point<acc_t>(coords, labels, nearest_out, q, fill);
    } else if (op == LabelOp::Soft) {
      warp_labels_soft_point<acc_t>(coords, labels, soft_out, q);
    } else {
      warp_labels_soft_backward_point<acc_t>(coords, labels, grad_out, grad_ddf, q);
    }
  }
}

template <typename TL, typename T, typename I>
void launch_typed(const LabelArgs& a, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const SampleArgs& s = a.sample;
  const int64_t needed = (s.num_points() + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(std::max<int64_t>(needed, 1), 65535 * 8));
  const Shape<I> shape{static_cast<I>(s.out_size[0]), static_cast<I>(s.out_size[1]), static_cast<I>(s.out_size[2]),
                       s.num_points()};
  const bool nearest = a.op == LabelOp::Nearest;
  const bool soft = a.op == LabelOp::Soft;
  dispatch_coords<T, I>(s, [&](const auto& coords) {
    labels_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        coords, make_volume<const TL, I>(s.input), make_volume<TL, I>(nearest ? s.output : TensorArg{}),
        make_volume<T, I>(soft ? s.output : TensorArg{}),
        make_volume<const T, I>(!nearest && !soft ? s.output : TensorArg{}), make_volume<T, I>(s.grad_coords),
        shape, a.op, static_cast<TL>(a.fill));
  });
}

}  // namespace

cudaError_t launch_labels(const LabelArgs& args, cudaStream_t stream) {
  dispatch_label_types(args.sample, [&](auto label_tag, auto float_tag, auto index_tag) {
    launch_typed<typename decltype(label_tag)::type, typename decltype(float_tag)::type,
                 typename decltype(index_tag)::type>(args, stream);
  });
  return cudaGetLastError();
}

}  // namespace deepatlas
