// CUDA registration of the fused warped Dice: device guard, current stream, then dice_kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dice_glue.h"
#include "dice_launch.h"

namespace deepatlas {
namespace {

struct CudaDiceRunner {
  static void run_dice(const DiceArgs& a, c10::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(launch_dice(a, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace

DEEPATLAS_REGISTER_DICE_OPS(CUDA, CudaDiceRunner)

}  // namespace deepatlas
