// CUDA registration of every op: each runner sets the device guard and launches its kernels (the .cu files) on
// the current stream. Compiled by the host compiler; includes only the light c10/cuda headers (not
// ATen/cuda/CUDAContext.h, which needs the full toolkit).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dice_glue.h"
#include "dice_launch.h"
#include "jacobian_glue.h"
#include "jacobian_launch.h"
#include "labels_glue.h"
#include "labels_launch.h"
#include "sample_glue.h"
#include "sample_launch.h"

namespace deepatlas {
namespace {

template <typename Args>
void launch_on_current_stream(cudaError_t (*launch)(const Args&, cudaStream_t), const Args& args,
                              c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch(args, c10::cuda::getCurrentCUDAStream().stream()));
}

struct CudaRunner {
  static constexpr bool kAtomicScatter = true;  // sample_kernels.cu: atomicAdd into the input gradient
  static void run_forward(const SampleArgs& a, c10::Device device) {
    launch_on_current_stream(launch_sample_forward, a, device);
  }
  static void run_backward(const SampleArgs& a, c10::Device device) {
    launch_on_current_stream(launch_sample_backward, a, device);
  }
  static void run_backward_pairs(const PairScatterArgs& a, c10::Device device) {
    launch_on_current_stream(launch_sample_backward_pairs, a, device);
  }
  static void run_labels(const LabelArgs& a, c10::Device device) { launch_on_current_stream(launch_labels, a, device); }
  static void run_jacobian(const JacobianArgs& a, c10::Device device) {
    launch_on_current_stream(launch_jacobian, a, device);
  }
  static void run_dice(const DiceArgs& a, c10::Device device) {
    // The forward's per-class sums and a probability source's gradient are accumulated with atomicAdd: an error
    // under torch.use_deterministic_algorithms(True), a warning with warn_only=True, as torch does for its own ops.
    // deepatlas_cuda.warped_dice does not call this op in that mode (it warps, then sums). The other gradients
    // are gathers, deterministic.
    if (a.sums != nullptr || a.grad_source.data != nullptr) {
      at::globalContext().alertNotDeterministic("deepatlas::warped_dice_sums (CUDA)");
    }
    launch_on_current_stream(launch_dice, a, device);
  }
};

}  // namespace

DEEPATLAS_REGISTER_SAMPLE_OPS(CUDA, CudaRunner)
DEEPATLAS_REGISTER_LABEL_OPS(CUDA, CudaRunner)
DEEPATLAS_REGISTER_JACOBIAN_OPS(CUDA, CudaRunner)
DEEPATLAS_REGISTER_DICE_OPS(CUDA, CudaRunner)

}  // namespace deepatlas
