// CUDA backend of the fused warped Dice. Forward: each block accumulates its points' [3, K] sums in shared memory
// (when they fit; else straight into global memory) and adds them to the batch element's sums with atomics.
// Backward: a gather per point for the ddf and target gradients, and for a probability source the scatter of its
// gradient with atomics (grad_source zero-initialised), in the same kernel.
#include <cuda_runtime.h>

#include <algorithm>

#include "deepatlas/dice.h"
#include "dice_launch.h"

namespace deepatlas {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedBytes = 32 * 1024;

struct AtomicAdd {
  __device__ void operator()(double* p, double v) const { atomicAdd(p, v); }
  __device__ void operator()(float* p, float v) const { atomicAdd(p, v); }
};

template <typename I>
struct Shape {
  I d, h, w;
  int64_t points;
};

// Blocks cover contiguous point ranges; `shared` accumulates the sums of the batch element of the block's first
// point, points of any other batch element go straight to global memory.
template <typename Coords, typename Source, typename Target, typename I>
__global__ void dice_forward_kernel(Coords coords, Source source, Target target, Shape<I> shape,
                                    I classes, double* sums, bool use_shared) {
  extern __shared__ double shared[];
  const int64_t width = 3 * int64_t(classes);
  const int64_t block_first = blockIdx.x * int64_t(blockDim.x);
  const int64_t per_batch = int64_t(shape.d) * shape.h * shape.w;
  const int64_t block_batch = block_first / per_batch;
  if (use_shared) {
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) shared[k] = 0;
    __syncthreads();
  }
  const int64_t p = block_first + threadIdx.x;
  if (p < shape.points) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w);
    double* target_sums = use_shared && q.n == block_batch ? shared : sums + q.n * width;
    warped_dice_point<double>(coords, source, target, q, classes, target_sums, AtomicAdd{});
  }
  if (use_shared) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
      if (shared[k] != 0) atomicAdd(&sums[block_batch * width + k], shared[k]);
    }
  }
}

template <typename Coords, typename Source, typename Target, typename T, typename I>
__global__ void dice_backward_kernel(Coords coords, Source source, Target target, Shape<I> shape, I classes,
                                     const double* grad_sums, Volume<T, I> grad_ddf, Volume<T, I> grad_target,
                                     Volume<T, I> grad_source) {
  const bool gather = grad_ddf.data != nullptr || grad_target.data != nullptr;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < shape.points;
       p += int64_t(blockDim.x) * gridDim.x) {
    const Point<I> q = unravel_point<I>(static_cast<I>(p), shape.d, shape.h, shape.w);
    const double* g = grad_sums + q.n * 3 * int64_t(classes);
    if (gather) warped_dice_backward_point<double>(coords, source, target, q, classes, g, grad_ddf, grad_target);
    if constexpr (IsProbSource<Source>::value) {
      if (grad_source.data != nullptr) {
        warped_dice_source_grad_point<double>(coords, target, q, classes, g, grad_source, I(0), classes,
                                              AtomicAdd{});
      }
    }
  }
}

template <typename T, typename I, typename Source, typename Target>
void launch(const DiceArgs& a, const Source& source, const Target& target, cudaStream_t stream) {
  const SampleArgs& s = a.sample;
  const Shape<I> shape{static_cast<I>(s.out_size[0]), static_cast<I>(s.out_size[1]), static_cast<I>(s.out_size[2]),
                       s.num_points()};
  const I classes = static_cast<I>(a.classes);
  dispatch_coords<T, I>(s, [&](const auto& coords) {
    if (a.grad_sums == nullptr) {
      const int64_t shared_bytes = 3 * a.classes * int64_t(sizeof(double));
      const bool use_shared = shared_bytes <= kMaxSharedBytes;
      const int64_t blocks = (shape.points + kThreads - 1) / kThreads;  // one point per thread
      dice_forward_kernel<<<static_cast<unsigned>(blocks), kThreads, use_shared ? shared_bytes : 0, stream>>>(
          coords, source, target, shape, classes, a.sums, use_shared);
    } else {
      const int blocks = static_cast<int>(std::min<int64_t>((shape.points + kThreads - 1) / kThreads, 65535 * 8));
      dice_backward_kernel<<<blocks, kThreads, 0, stream>>>(
          coords, source, target, shape, classes, a.grad_sums, make_volume<T, I>(s.grad_coords),
          make_volume<T, I>(a.grad_target), make_volume<T, I>(a.grad_source));
    }
  });
}

}  // namespace

cudaError_t launch_dice(const DiceArgs& args, cudaStream_t stream) {
  dispatch_dice(args, [&](auto float_tag, auto index_tag, const auto& source, const auto& target) {
    launch<typename decltype(float_tag)::type, typename decltype(index_tag)::type>(args, source, target, stream);
  });
  return cudaGetLastError();
}

}  // namespace deepatlas
