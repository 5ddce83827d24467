// A strided view of a 5-D tensor (pointer + sizes + strides), valid on host and device. Index type I is int32_t
// on the fast path and int64_t when an offset can exceed 2^31 - 1.
#pragma once

#include "deepatlas/macros.h"
#include "deepatlas/sample_args.h"

namespace deepatlas {

template <typename T, typename I>
struct Volume {
  T* data;
  I size[5];
  I stride[5];

  DA_HD T& at(I a, I b, I c, I d, I e) const {
    return data[a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3] + e * stride[4]];
  }
};

template <typename T, typename I>
inline Volume<T, I> make_volume(const TensorArg& t) {
  Volume<T, I> v;
  v.data = static_cast<T*>(t.data);
  for (int k = 0; k < 5; ++k) {
    v.size[k] = static_cast<I>(t.size[k]);
    v.stride[k] = static_cast<I>(t.stride[k]);
  }
  return v;
}

// A flat point index p over [N, D', H', W'] split into its coordinates.
template <typename I>
struct Point {
  I n, z, y, x;
};

template <typename I>
DA_HD Point<I> unravel_point(I p, I d, I h, I w) {
  Point<I> q;
  q.x = p % w;
  p /= w;
  q.y = p % h;
  p /= h;
  q.z = p % d;
  q.n = p / d;
  return q;
}

}  // namespace deepatlas
