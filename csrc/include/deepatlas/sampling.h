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
  if (align_corners && size == 1) {  // every finite coordinate maps to the only voxel; +-inf and NaN stay for pad_coord
    *factor = 0;
    return da_isfinite(coord) ? static_cast<acc_t>(0) : coord;
  }
  if (align_corners) {
    *factor = static_cast<acc_t>(size - 1) / 2;
    return ((coord + 1) / 2) * (size - 1);
  }
  *factor = static_cast<acc_t>(size) / 2;
  return ((coord + 1) * size - 1) / 2;
}

// Clamp into [0, size - 1]; the gradient is 0 on and beyond the borders (torch's convention). Written as selects
// (no branches) so that a CPU loop over points vectorises; NaN passes through with gradient 1, as in torch.
template <typename acc_t>
DA_HD acc_t clip_coord_with_grad(acc_t in, int64_t size, acc_t* grad) {
  const acc_t max = static_cast<acc_t>(size - 1);
  const bool low = in <= static_cast<acc_t>(0);
  const bool high = in >= max;
  *grad = (low || high) ? acc_t(0) : acc_t(1);
  const acc_t out = low ? acc_t(0) : in;
  return high ? max : out;
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
  // Beyond 2^53 every float and double is an even integer, so the parity of the flips survives the bound; without
  // it the cast would be undefined on the CPU past 2^63 (x86: INT64_MIN, even) and saturate on a GPU (odd).
  const acc_t even_beyond = static_cast<acc_t>(9007199254740992.0);  // 2^53
  const acc_t whole_spans = da_floor(in / span);
  const int64_t flips = static_cast<int64_t>(whole_spans < even_beyond ? whole_spans : even_beyond);
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
  if (padding == Padding::Reflection && !da_isfinite(in)) {  // before reflecting: a size-1 axis reflects to 0
    *grad = 0;
    return static_cast<acc_t>(kOutsideCoord);
  }
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
  // One compare catches NaN, +-inf and huge values (a select, not a branch).
  const bool safe = da_fabs(out) <= static_cast<acc_t>(kMaxSafeCoord);
  *grad = safe ? *grad : acc_t(0);
  return safe ? out : static_cast<acc_t>(kOutsideCoord);
}

// The unsigned type of an index type, for range checks in one compare.
template <typename I>
struct UnsignedOf;
template <>
struct UnsignedOf<int32_t> { using type = uint32_t; };
template <>
struct UnsignedOf<int64_t> { using type = uint64_t; };

template <typename I>
DA_HD bool in_range(I i, I size) {
  return i >= 0 && i < size;
}

// Weight of corner k = 4 dz + 2 dy + dx from the 1-D weights (lower w0, upper w1 per axis), in torch's order.
template <typename acc_t>
DA_HD acc_t trilinear_weight(const acc_t w0[3], const acc_t w1[3], int corner) {
  return ((corner & 1) ? w1[2] : w0[2]) * (((corner >> 1) & 1) ? w1[1] : w0[1]) * ((corner >> 2) ? w1[0] : w0[0]);
}

// Gradient of sum_k weight(k) * v[k] with respect to c = (z, y, x), factorised per axis: the differences of v along
// that axis, weighted by the other two axes' weights.
template <typename acc_t>
DA_HD void trilinear_gradient(const acc_t w0[3], const acc_t w1[3], const acc_t v[8], acc_t g[3]) {
  g[2] = w0[0] * (w0[1] * (v[1] - v[0]) + w1[1] * (v[3] - v[2])) +
         w1[0] * (w0[1] * (v[5] - v[4]) + w1[1] * (v[7] - v[6]));
  g[1] = w0[0] * (w0[2] * (v[2] - v[0]) + w1[2] * (v[3] - v[1])) +
         w1[0] * (w0[2] * (v[6] - v[4]) + w1[2] * (v[7] - v[5]));
  g[0] = w0[1] * (w0[2] * (v[4] - v[0]) + w1[2] * (v[5] - v[1])) +
         w1[1] * (w0[2] * (v[6] - v[2]) + w1[2] * (v[7] - v[3]));
}

// The 2x2x2 neighbourhood of a location c = (z, y, x) for trilinear interpolation. Corner k = 4 dz + 2 dy + dx
// (dz, dy, dx in {0, 1}) sits at lo + (dz, dy, dx); its weight is the product of the 1-D weights w0 = (lo + 1) - c
// (lower neighbour) and w1 = c - lo (upper neighbour), formed in torch's order (x * y * z). Corners outside the
// volume are flagged and given offset 0, so no caller ever forms an out-of-bounds address.
template <typename acc_t, typename I>
struct Trilinear {
  using U = typename UnsignedOf<I>::type;
  acc_t w0[3];
  acc_t w1[3];
  I offset[8];    // spatial offset of each corner: z * stride_z + y * stride_y + x * stride_x
  bool inside[8];
  bool all_inside;  // the common case: no corner needs a bounds check

  DA_HD Trilinear(const acc_t c[3], const I size[3], const I stride[3]) {
    I lo[3];
    all_inside = lower_corner(c, size, lo, w0, w1);
    if (all_inside) {  // the common case: corner offsets are the lower corner's plus fixed steps
      const I base = lower_offset(lo, stride);
      for (int corner = 0; corner < 8; ++corner) {
        offset[corner] = base + corner_step(corner, stride);
        inside[corner] = true;
      }
      return;
    }
    // Offsets only for neighbours inside the volume: lo may lie far outside, where lo * stride overflows I.
    bool valid[3][2];
    I axis_offset[3][2];
    for (int k = 0; k < 3; ++k) {
      valid[k][0] = in_range<I>(lo[k], size[k]);
      valid[k][1] = in_range<I>(lo[k] + 1, size[k]);
      axis_offset[k][0] = valid[k][0] ? lo[k] * stride[k] : I(0);
      axis_offset[k][1] = valid[k][1] ? (lo[k] + 1) * stride[k] : I(0);
    }
    for (int dz = 0; dz < 2; ++dz) {
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          const int corner = 4 * dz + 2 * dy + dx;
          inside[corner] = valid[0][dz] && valid[1][dy] && valid[2][dx];
          offset[corner] = inside[corner] ? axis_offset[0][dz] + axis_offset[1][dy] + axis_offset[2][dx] : I(0);
        }
      }
    }
  }
  // The lower corner lo = floor(c) and the 1-D weights; true when lo and lo + 1 both lie in [0, size) on every
  // axis, tested as one unsigned compare per axis (a negative lo wraps to a huge value). Needs size >= 1, which
  // every op's glue checks (non-empty spatial dimensions). Branch-free, so a CPU loop over points vectorises it.
  DA_HD static bool lower_corner(const acc_t c[3], const I size[3], I lo[3], acc_t w0[3], acc_t w1[3]) {
    bool all_inside = true;
    for (int k = 0; k < 3; ++k) {
      const acc_t f = da_floor_bounded(c[k]);  // |c| <= 2^30 after pad_coord
      lo[k] = static_cast<I>(f);
      w0[k] = (f + 1) - c[k];
      w1[k] = c[k] - f;
      all_inside = all_inside & (static_cast<U>(lo[k]) < static_cast<U>(size[k] - 1));
    }
    return all_inside;
  }
  // Spatial offset of the lower corner (only for lo inside the volume: far outside, lo * stride overflows I).
  DA_HD static I lower_offset(const I lo[3], const I stride[3]) {
    return lo[0] * stride[0] + lo[1] * stride[1] + lo[2] * stride[2];
  }
  // All corners inside: offset of corner k from corner 0, the same for every location (a loop over points keeps
  // it in a register instead of loading offset[k]).
  DA_HD static I corner_step(int corner, const I stride[3]) {
    return ((corner >> 2) ? stride[0] : I(0)) + (((corner >> 1) & 1) ? stride[1] : I(0)) +
           ((corner & 1) ? stride[2] : I(0));
  }
  DA_HD acc_t weight(int corner) const { return trilinear_weight(w0, w1, corner); }
  DA_HD void gradient(const acc_t v[8], acc_t g[3]) const { trilinear_gradient(w0, w1, v, g); }
};

// The nearest voxel of a location (round half to even, as torch); offset 0 when outside.
template <typename acc_t, typename I>
struct Nearest {
  I offset;
  bool inside;

  DA_HD Nearest(const acc_t c[3], const I size[3], const I stride[3]) {
    I i[3];
    inside = true;
    for (int k = 0; k < 3; ++k) {
      i[k] = static_cast<I>(da_nearbyint(c[k]));
      inside = inside & (static_cast<typename UnsignedOf<I>::type>(i[k]) <
                         static_cast<typename UnsignedOf<I>::type>(size[k]));  // in [0, size) in one compare
    }
    offset = inside ? i[0] * stride[0] + i[1] * stride[1] + i[2] * stride[2] : I(0);
  }
};

}  // namespace deepatlas
