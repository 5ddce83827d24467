// CUDA backend of jacobian_det: grid-stride kernels over voxels -> deepatlas/jacobian.h. Backward in two kernels
// on one stream: the gradient coefficients of every voxel into a buffer, then a gather (deterministic, no atomics).
#include <cuda_runtime.h>

#include <algorithm>

#include "deepatlas/jacobian.h"
#include "deepatlas/sample_dispatch.h"
#include "jacobian_launch.h"

namespace deepatlas {
namespace {

constexpr int kThreads = 256;

template <typename acc_t, typename T, typename I>
__global__ void jacobian_forward_kernel(Volume<const T, I> ddf, Volume<T, I> out, JacobianParams<acc_t> params,
                                        int64_t points) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), ddf.size[2], ddf.size[3], ddf.size[4]);
    jacobian_det_point(ddf, out, q, params);
  }
}

// Backward pass 1: the 9 gradient coefficients of every voxel into coefficients [N, 9, D, H, W].
template <typename acc_t, typename T, typename I>
__global__ void jacobian_coefficients_kernel(Volume<const T, I> ddf, Volume<const T, I> grad_out,
                                             Volume<acc_t, I> coefficients, JacobianParams<acc_t> params,
                                             int64_t points) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), ddf.size[2], ddf.size[3], ddf.size[4]);
    jacobian_det_coefficients_point(ddf, grad_out, coefficients, q, params);
  }
}

// Backward pass 2: grad_ddf gathered from the coefficients of each voxel and its six face neighbours.
template <typename acc_t, typename T, typename I>
__global__ void jacobian_gather_kernel(Volume<const acc_t, I> coefficients, Volume<T, I> grad_ddf,
                                       JacobianParams<acc_t> params, int64_t points) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), grad_ddf.size[2], grad_ddf.size[3], grad_ddf.size[4]);
    jacobian_det_gather_point(coefficients, grad_ddf, q, params);
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
    const auto ddf = make_volume<const T, I>(a.sample.coords);
    if (!a.backward) {
      jacobian_forward_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(ddf, make_volume<T, I>(a.sample.output),
                                                                      params, points);
      return;
    }
    // a.coefficients: the [N, 9, D, H, W] buffer allocated by jacobian_glue.h, in acc_t.
    jacobian_coefficients_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        ddf, make_volume<const T, I>(a.sample.output), make_volume<acc_t, I>(a.coefficients), params, points);
    jacobian_gather_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        make_volume<const acc_t, I>(a.coefficients), make_volume<T, I>(a.sample.grad_coords), params, points);
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
