// Entry point of the CUDA jacobian_det kernels (jacobian_kernels.cu); no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "deepatlas/sample_args.h"

namespace deepatlas {

cudaError_t launch_jacobian(const JacobianArgs& args, cudaStream_t stream);

}  // namespace deepatlas
