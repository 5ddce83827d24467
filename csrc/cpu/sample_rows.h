// The CPU loops of the trilinear sampler (grid_sample / warp: forward, coordinate gradient, image-gradient
// scatter), one row of output points at a time in chunks of kRowChunk points, in two passes:
//   1. locate: the sampling location, its padding, the lower corner, the weights and the all-inside test of every
//      point of the chunk: branch-free arithmetic that g++ vectorises (SSE2, 4 floats at a time);
//   2. gather: the 8 corner reads per point and channel, scalar, with the corner steps in registers.
// Per point this is exactly the arithmetic of sample_forward_point, sample_backward_coords_point and
// sample_backward_input_point (deepatlas/warp.h), made of the same functions, in the same order: the results are
// bit-identical (tests/test_cpu_row_loops.py checks it against those per-point functions, which CUDA runs). Points
// with a corner outside the volume take the same out-of-line edge functions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "deepatlas/warp.h"

namespace deepatlas {

constexpr int kRowChunk = 32;

// Pass 1's results for up to kRowChunk consecutive points of a row, one array per quantity (so that pass 1 vectorises).
template <typename acc_t, typename I>
struct RowChunk {
  acc_t c[3][kRowChunk];   // location (z, y, x) after padding
  acc_t dc[3][kRowChunk];  // d(location)/d(stored coordinate)
  acc_t w0[3][kRowChunk];  // 1-D weights of the lower neighbour
  acc_t w1[3][kRowChunk];  // and of the upper one
  acc_t w[8][kRowChunk];   // corner weights
  I offset[kRowChunk];     // spatial offset of corner 0 (0 unless all_inside)
  bool all_inside[kRowChunk];

  // The full neighbourhood of point i, for points with a corner outside the volume.
  DA_INLINE Trilinear<acc_t, I> neighbourhood(int i, const I size[3], const I stride[3]) const {
    const acc_t loc[3] = {c[0][i], c[1][i], c[2][i]};
    return Trilinear<acc_t, I>(loc, size, stride);
  }
};

// Pass 1 for points (q.n, q.z, q.y, q.x + i), i < n.
template <typename acc_t, typename Coords, typename I, typename Pad>
DA_INLINE void locate_chunk(const Coords& coords, Point<I> q, int n, const I size[3], const I stride[3], Pad padding,
                            RowChunk<acc_t, I>& r) {
  const I x0 = q.x;
  const I strides[3] = {stride[0], stride[1], stride[2]};  // loop invariants, in registers
  for (int i = 0; i < n; ++i) {
    q.x = x0 + static_cast<I>(i);
    const Location<acc_t, I> loc = locate<acc_t>(coords, q, size, padding);
    I lo[3];
    acc_t w0[3];
    acc_t w1[3];
    const bool inside = Trilinear<acc_t, I>::lower_corner(loc.c, size, lo, w0, w1);
    for (int k = 0; k < 3; ++k) {
      r.c[k][i] = loc.c[k];
      r.dc[k][i] = loc.dc[k];
      r.w0[k][i] = w0[k];
      r.w1[k][i] = w1[k];
    }
    for (int k = 0; k < 8; ++k) r.w[k][i] = trilinear_weight(w0, w1, k);
    for (int k = 0; k < 3; ++k) lo[k] = inside ? lo[k] : I(0);  // far outside, lo * stride would overflow I
    r.offset[i] = Trilinear<acc_t, I>::lower_offset(lo, strides);
    r.all_inside[i] = inside;
  }
}

template <typename I>
DA_INLINE Point<I> at_x(Point<I> q, I x) {
  q.x = x;
  return q;
}

// Forward, trilinear: out[q.n, :, q.z, q.y, x] for x in [0, width).
template <typename acc_t, typename Coords, typename TIn, typename I, typename Pad>
DA_INLINE void sample_forward_row(const Coords& coords, const Volume<const TIn, I>& input, const Volume<TIn, I>& out,
                                  Point<I> q, I width, Pad padding) {
  const SpatialGeometry<const TIn, I> geo(input);
  const CornerSteps<acc_t, I> steps(geo.stride);
  const I channels = input.size[1];
  const TIn* base = input.data + input_batch(q.n, input.size[0]) * input.stride[0];
  const I out_x = out.stride[4];
  RowChunk<acc_t, I> r;
  for (I x0 = 0; x0 < width; x0 += kRowChunk) {
    const int n = static_cast<int>(std::min<I>(kRowChunk, width - x0));
    q.x = x0;
    locate_chunk(coords, q, n, geo.size, geo.stride, padding, r);
    TIn* dst = &out.at(q.n, 0, q.z, q.y, x0);
    for (I ch = 0; ch < channels; ++ch) {
      const TIn* plane = base + ch * input.stride[1];
      TIn* dst_channel = dst + ch * out.stride[1];
      for (int i = 0; i < n; ++i) {
        if (!r.all_inside[i]) continue;
        acc_t w[8];
        for (int k = 0; k < 8; ++k) w[k] = r.w[k][i];
        dst_channel[i * out_x] = from_acc<TIn>(interpolate_inside(plane + r.offset[i], steps, w));
      }
    }
    for (int i = 0; i < n; ++i) {
      if (r.all_inside[i]) continue;
      const Trilinear<acc_t, I> t = r.neighbourhood(i, geo.size, geo.stride);
      acc_t w[8];
      for (int k = 0; k < 8; ++k) w[k] = r.w[k][i];
      forward_channels_edge(t, w, base, input.stride[1], dst + i * out_x, out.stride[1], channels);
    }
  }
}

// Gradient with respect to the stored coordinates, trilinear: grad_coords at (q.n, q.z, q.y, x), x in [0, width).
template <typename acc_t, typename Coords, typename TIn, typename TGrad, typename I, typename Pad>
DA_INLINE void sample_backward_coords_row(const Coords& coords, const Volume<const TIn, I>& input,
                                          const Volume<const TIn, I>& grad_out, const Volume<TGrad, I>& grad_coords,
                                          Point<I> q, I width, Pad padding) {
  const SpatialGeometry<const TIn, I> geo(input);
  const CornerSteps<acc_t, I> steps(geo.stride);
  const I channels = input.size[1];
  const TIn* base = input.data + input_batch(q.n, input.size[0]) * input.stride[0];
  const I go_x = grad_out.stride[4];
  RowChunk<acc_t, I> r;
  acc_t g[3][kRowChunk];
  for (I x0 = 0; x0 < width; x0 += kRowChunk) {
    const int n = static_cast<int>(std::min<I>(kRowChunk, width - x0));
    q.x = x0;
    locate_chunk(coords, q, n, geo.size, geo.stride, padding, r);
    const TIn* go = &grad_out.at(q.n, 0, q.z, q.y, x0);
    for (int k = 0; k < 3; ++k) std::fill(g[k], g[k] + n, acc_t(0));
    for (I ch = 0; ch < channels; ++ch) {
      const TIn* plane = base + ch * input.stride[1];
      const TIn* go_channel = go + ch * grad_out.stride[1];
      for (int i = 0; i < n; ++i) {
        if (!r.all_inside[i]) continue;
        acc_t v[8];
        gather_inside(plane + r.offset[i], steps, v);
        const acc_t w0[3] = {r.w0[0][i], r.w0[1][i], r.w0[2][i]};
        const acc_t w1[3] = {r.w1[0][i], r.w1[1][i], r.w1[2][i]};
        acc_t gc[3];
        trilinear_gradient(w0, w1, v, gc);
        const acc_t go_value = to_acc<acc_t>(go_channel[i * go_x]);
        for (int axis = 0; axis < 3; ++axis) g[axis][i] += gc[axis] * go_value;
      }
    }
    for (int i = 0; i < n; ++i) {
      acc_t gi[3] = {g[0][i], g[1][i], g[2][i]};
      if (!r.all_inside[i]) {
        const Trilinear<acc_t, I> t = r.neighbourhood(i, geo.size, geo.stride);
        coords_grad_channels_edge(t, base, input.stride[1], go + i * go_x, grad_out.stride[1], channels, gi);
      }
      for (int k = 0; k < 3; ++k) gi[k] *= r.dc[k][i];
      coords.write_grad(grad_coords, at_x(q, x0 + i), gi);
    }
  }
}

// Input-gradient scatter, trilinear, one channel: adds grad_out[q.n, ch, q.z, q.y, x] times each corner weight into
// grad_input through add (cpu/sample_cpu.cpp's OwnedAdd), for x in [0, width), in the order of
// sample_backward_input_point: point by point, corner 0 to 7.
template <typename acc_t, typename Coords, typename TIn, typename TAcc, typename I, typename Pad, typename Add>
DA_INLINE void sample_backward_input_row(const Coords& coords, const Volume<const TIn, I>& grad_out,
                                         const Volume<TAcc, I>& grad_input, Point<I> q, I width, I ch, Pad padding,
                                         Add add) {
  const SpatialGeometry<TAcc, I> geo(grad_input);
  const CornerSteps<acc_t, I> steps(geo.stride);
  TAcc* plane = grad_input.data + input_batch(q.n, grad_input.size[0]) * grad_input.stride[0] +
                ch * grad_input.stride[1];
  const I go_x = grad_out.stride[4];
  RowChunk<acc_t, I> r;
  for (I x0 = 0; x0 < width; x0 += kRowChunk) {
    const int n = static_cast<int>(std::min<I>(kRowChunk, width - x0));
    q.x = x0;
    locate_chunk(coords, q, n, geo.size, geo.stride, padding, r);
    const TIn* go = &grad_out.at(q.n, ch, q.z, q.y, x0);
    for (int i = 0; i < n; ++i) {
      const acc_t go_value = to_acc<acc_t>(go[i * go_x]);
      acc_t w[8];
      for (int k = 0; k < 8; ++k) w[k] = r.w[k][i];
      if (r.all_inside[i]) {
        TAcc* first = plane + r.offset[i];
        for (int k = 0; k < 8; ++k) add(first + steps.step[k], static_cast<TAcc>(w[k] * go_value));
      } else {
        scatter_corners(r.neighbourhood(i, geo.size, geo.stride), plane, w, go_value, add);
      }
    }
  }
}

}  // namespace deepatlas
