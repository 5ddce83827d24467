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

// A rarely taken per-voxel path kept out of line, so that the common path of the loop around it stays small.
#ifdef __CUDACC__
#define DA_HD_COLD DA_HOST_DEVICE __noinline__
#else
#define DA_HD_COLD __attribute__((noinline, cold))
#endif

namespace deepatlas {

DA_HD float da_floor(float v) { return floorf(v); }
DA_HD double da_floor(double v) { return floor(v); }
// floor for |v| <= 2^30 (callers bound coordinates first): one truncation and a compare, where g++ without SSE4.1
// would otherwise emulate floorf with a long sequence.
template <typename acc_t>
DA_HD acc_t da_floor_bounded(acc_t v) {
#ifdef __CUDA_ARCH__
  return da_floor(v);
#else
  const acc_t t = static_cast<acc_t>(static_cast<int32_t>(v));
  return t - static_cast<acc_t>(t > v);  // minus 0 or 1, no select: a loop over points vectorises it
#endif
}
DA_HD float da_fabs(float v) { return fabsf(v); }
DA_HD double da_fabs(double v) { return fabs(v); }
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
