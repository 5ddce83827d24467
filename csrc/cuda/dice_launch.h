// Entry point of the CUDA fused warped-Dice kernels (dice_kernels.cu); no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "deepatlas/sample_args.h"

namespace deepatlas {

// Forward: args.sums must be zero-initialised; backward: args.grad_source too (when set).
cudaError_t launch_dice(const DiceArgs& args, cudaStream_t stream);

}  // namespace deepatlas
