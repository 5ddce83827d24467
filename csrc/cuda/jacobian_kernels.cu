// CUDA backend of jacobian_det: grid-stride kernels over voxels -> deepatlas/jacobian.h.
#include <cuda_runtime.h>

#include <algorithm>

#include "deepatlas/jacobian.h"
#include "deepatlas/sample_dispatch.h"
#include "jacobian_launch.h"

namespace deepatlas {
namespace {

constexpr int kThreads = 256;

template <typename acc_t, typename T, typename I>
__global__ void jacobian_kernel(Volume<const T, I> ddf, Volume<T, I> out, Volume<const T, I> grad_out,
                                Volume<T, I> grad_ddf, JacobianParams<acc_t> params, int64_t points, bool backward) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), ddf.size[2], ddf.size[3], ddf.size[4]);
    if (backward) {
      jacobian_det_backward_point(ddf, grad_out, grad_ddf, q, params);
    } else {
      jacobian_det_point(ddf, out, q, params);
    }
  }
}

template <typename T>
void launch_typed(const JacobianArgs& a, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  JacobianParams<acc_t> params;
  for (int k = 0; k < 3; ++k) {
    params.inv_spacing[k] = static_cast<acc_t>(1.0 / a.spacing[k]);
    params.scheme[k] = a.scheme[k];
  }
  const int64_t points = a.sample.num_points();
  const int blocks = static_cast<int>(std::min<int64_t>(std::max<int64_t>((points + kThreads - 1) / kThreads, 1),
                                                        65535 * 8));
  dispatch_index(a.sample.index64, [&](auto index_tag) {
    using I = typename decltype(index_tag)::type;
    jacobian_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        make_volume<const T, I>(a.sample.coords), make_volume<T, I>(a.backward ? TensorArg{} : a.sample.output),
        make_volume<const T, I>(a.backward ? a.sample.output : TensorArg{}), make_volume<T, I>(a.sample.grad_coords),
        params, points, a.backward);
  });
}

}  // namespace

cudaError_t launch_jacobian(const JacobianArgs& args, cudaStream_t stream) {
  if (args.sample.coords.dtype == DType::Float64) {
    launch_typed<double>(args, stream);
  } else {
    launch_typed<float>(args, stream);
  }
  return cudaGetLastError();
}

}  // namespace deepatlas
