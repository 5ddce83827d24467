// Host/device macros and the few math helpers whose spelling differs between g++ and nvcc.
// Every header in this folder is compiled by both compilers: keep it free of torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DA_HOST_DEVICE __host__ __device__
#define DA_INLINE __forceinline__
#else
#define DA_HOST_DEVICE
#define DA_INLINE inline __attribute__((always_inline))
#endif

// Every per-voxel function: callable from a CPU loop and from a CUDA kernel.
#define DA_HD DA_HOST_DEVICE DA_INLINE

namespace deepatlas {

DA_HD float da_floor(float v) { return floorf(v); }
DA_HD double da_floor(double v) { return floor(v); }
DA_HD float da_fmod(float a, float b) { return fmodf(a, b); }
DA_HD double da_fmod(double a, double b) { return fmod(a, b); }
// Round half to even, as torch's nearest mode does (std::nearbyint under the default rounding mode).
DA_HD float da_nearbyint(float v) { return nearbyintf(v); }
DA_HD double da_nearbyint(double v) { return nearbyint(v); }

template <typename acc_t>
DA_HD bool da_isfinite(acc_t v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

}  // namespace deepatlas
