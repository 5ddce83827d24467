// CUDA registration of the label warps: device guard, current stream, then labels_kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "labels_glue.h"
#include "labels_launch.h"

namespace deepatlas {
namespace {

struct CudaLabelRunner {
  static void run_labels(const LabelArgs& a, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(launch_labels(a, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace

DEEPATLAS_REGISTER_LABEL_OPS(CUDA, CudaLabelRunner)

}  // namespace deepatlas
