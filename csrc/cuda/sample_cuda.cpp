// CUDA registration of the sampler ops: device guard, current stream, then the kernels in sample_kernels.cu.
// Compiled by the host compiler; includes only the light c10/cuda headers (not ATen/cuda/CUDAContext.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sample_glue.h"
#include "sample_launch.h"

namespace deepatlas {
namespace {

struct CudaRunner {
  static void run_forward(const SampleArgs& a, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(launch_sample_forward(a, c10::cuda::getCurrentCUDAStream().stream()));
  }
  static void run_backward(const SampleArgs& a, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(launch_sample_backward(a, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace

DEEPATLAS_REGISTER_SAMPLE_OPS(CUDA, CudaRunner)

}  // namespace deepatlas
