// Coordinate handling shared by grid_sample and warp, written to match ATen's GridSampler.h formulas exactly
// (same operations in the same order) so that float32 results agree with torch to rounding.
//
// Padding modes along one axis of size 4 (voxels a b c d), for a coordinate that falls outside:
//   zeros:      0 0 0 | a b c d | 0 0 0
//   border:     a a a | a b c d | d d d
//   reflection: d c b | a b c d | c b a   (align_corners=True: mirror about the centres of the edge voxels)
//               c b a | a b c d | d c b   (align_corners=False: mirror about the outer faces of the edge voxels)
#pragma once

#include "deepatlas/macros.h"
#include "deepatlas/sample_args.h"

namespace deepatlas {

// Coordinates beyond this magnitude, and non-finite ones, are treated as outside the volume (torch maps them to
// -100 for the same reason: they cannot be converted to an integer index safely).
constexpr double kMaxSafeCoord = 1073741824.0;  // 2^30
constexpr double kOutsideCoord = -100.0;

// [-1, 1] -> voxel index space; *factor = d(result)/d(coord).
template <typename acc_t>
DA_HD acc_t unnormalize_coord(acc_t coord, int64_t size, bool align_corners, acc_t* factor) {
  if (align_corners) {
    *factor = static_cast<acc_t>(size - 1) / 2;
    return ((coord + 1) / 2) * (size - 1);
  }
  *factor = static_cast<acc_t>(size) / 2;
  return ((coord + 1) * size - 1) / 2;
}

// Clamp into [0, size - 1]; the gradient is 0 on and beyond the borders (torch's convention).
template <typename acc_t>
DA_HD acc_t clip_coord_with_grad(acc_t in, int64_t size, acc_t* grad) {
  if (in <= static_cast<acc_t>(0)) {
    *grad = 0;
    return 0;
  }
  const acc_t max = static_cast<acc_t>(size - 1);
  if (in >= max) {
    *grad = 0;
    return max;
  }
  *grad = 1;
  return in;
}

// Reflect into [twice_low / 2, twice_high / 2]; *grad is +1 or -1.
template <typename acc_t>
DA_HD acc_t reflect_coord_with_grad(acc_t in, int64_t twice_low, int64_t twice_high, acc_t* grad) {
  if (twice_low == twice_high) {
    *grad = 0;
    return 0;
  }
  const acc_t min = static_cast<acc_t>(twice_low) / 2;
  const acc_t span = static_cast<acc_t>(twice_high - twice_low) / 2;
  acc_t sign = 1;
  in = in - min;
  if (in < static_cast<acc_t>(0)) {
    sign = -1;
    in = -in;
  }
  const acc_t extra = da_fmod(in, span);
  const int64_t flips = static_cast<int64_t>(da_floor(in / span));
  if (flips % 2 == 0) {
    *grad = sign;
    return extra + min;
  }
  *grad = -sign;
  return span - extra + min;
}

// Apply the padding mode to a voxel-space coordinate. Returns the coordinate to sample at and sets *grad to
// d(result)/d(in). Non-finite or huge coordinates become kOutsideCoord with gradient 0.
template <typename acc_t>
DA_HD acc_t pad_coord(acc_t in, int64_t size, Padding padding, bool align_corners, acc_t* grad) {
  acc_t out = in;
  *grad = 1;
  if (padding == Padding::Border) {
    out = clip_coord_with_grad(in, size, grad);
  } else if (padding == Padding::Reflection) {
    acc_t reflect_grad;
    acc_t clip_grad;
    if (align_corners) {
      out = reflect_coord_with_grad(in, 0, 2 * (size - 1), &reflect_grad);
    } else {
      out = reflect_coord_with_grad(in, -1, 2 * size - 1, &reflect_grad);
    }
    out = clip_coord_with_grad(out, size, &clip_grad);
    *grad = reflect_grad * clip_grad;
  }
  if (!da_isfinite(out) || out > static_cast<acc_t>(kMaxSafeCoord) || out < static_cast<acc_t>(-kMaxSafeCoord)) {
    *grad = 0;
    return static_cast<acc_t>(kOutsideCoord);
  }
  return out;
}

template <typename I>
DA_HD bool in_range(I i, I size) {
  return i >= 0 && i < size;
}

// The 2x2x2 neighbourhood of a point for trilinear interpolation: the lower corner and the weights of the lower
// (w0 = upper - x) and upper (w1 = x - lower) neighbour along each axis, in (z, y, x) order.
template <typename acc_t, typename I>
struct Trilinear {
  I lo[3];
  acc_t w0[3];
  acc_t w1[3];
  bool valid_lo[3];
  bool valid_hi[3];

  DA_HD Trilinear(const acc_t c[3], const I size[3]) {
    for (int k = 0; k < 3; ++k) {
      const acc_t f = da_floor(c[k]);
      lo[k] = static_cast<I>(f);
      w0[k] = (f + 1) - c[k];
      w1[k] = c[k] - f;
      valid_lo[k] = in_range<I>(lo[k], size[k]);
      valid_hi[k] = in_range<I>(lo[k] + 1, size[k]);
    }
  }
  DA_HD acc_t weight(int axis, int hi) const { return hi ? w1[axis] : w0[axis]; }
  DA_HD bool valid(int axis, int hi) const { return hi ? valid_hi[axis] : valid_lo[axis]; }
};

}  // namespace deepatlas
