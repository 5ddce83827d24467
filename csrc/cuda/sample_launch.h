// Entry points of the CUDA sampler kernels (sample_kernels.cu). Plain C++ + CUDA runtime types only, so the .cu
// file compiles without torch headers. Both launch on `stream` and return the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include "deepatlas/pair_scatter.h"
#include "deepatlas/sample_args.h"

namespace deepatlas {

cudaError_t launch_sample_forward(const SampleArgs& args, cudaStream_t stream);
// grad_input (if requested) must be zero-initialised; it is float32 when the input is float16/bfloat16.
cudaError_t launch_sample_backward(const SampleArgs& args, cudaStream_t stream);
// The input gradient as (index, value) pairs, for the deterministic path (deepatlas/pair_scatter.h).
cudaError_t launch_sample_backward_pairs(const PairScatterArgs& args, cudaStream_t stream);

}  // namespace deepatlas
