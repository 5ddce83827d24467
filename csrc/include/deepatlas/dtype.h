// Conversions between a storage type and its accumulation type (float for half, bfloat16 and float; double for
// double). Half and bfloat16 exist only in CUDA builds; the CPU library instantiates float and double alone.
#pragma once

#include "deepatlas/macros.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace deepatlas {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Accumulate in double when either operand is double, else in float.
template <typename A, typename B>
struct CommonAcc {
  using type = typename AccType<A>::type;
};
template <typename B>
struct CommonAcc<double, B> {
  using type = double;
};
template <typename A>
struct CommonAcc<A, double> {
  using type = double;
};
template <>
struct CommonAcc<double, double> {
  using type = double;
};

template <typename acc_t, typename T>
DA_HD acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}
template <typename T, typename acc_t>
DA_HD T from_acc(acc_t v) {
  return static_cast<T>(v);
}

#ifdef __CUDACC__
template <>
DA_HD float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
DA_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
DA_HD __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
DA_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

}  // namespace deepatlas
