// CUDA registration of jacobian_det: device guard, current stream, then jacobian_kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "jacobian_glue.h"
#include "jacobian_launch.h"

namespace deepatlas {
namespace {

struct CudaJacobianRunner {
  static void run_jacobian(const JacobianArgs& a, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(launch_jacobian(a, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace

DEEPATLAS_REGISTER_JACOBIAN_OPS(CUDA, CudaJacobianRunner)

}  // namespace deepatlas
