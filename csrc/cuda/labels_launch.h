// Entry point of the CUDA label-warp kernels (labels_kernels.cu); no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "deepatlas/sample_args.h"

namespace deepatlas {

cudaError_t launch_labels(const LabelArgs& args, cudaStream_t stream);

}  // namespace deepatlas
