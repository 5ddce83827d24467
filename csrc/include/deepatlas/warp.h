// Per-point forward and backward of the 3-D sampler behind grid_sample and warp. One output point p = (n, z, y, x)
// reads its sampling location from a coordinate source (a normalised grid, or identity + displacement), applies
// the padding mode, and interpolates all C channels of the input there.
//
// Shapes: input [N_in, C, D, H, W] with N_in = N or 1 (broadcast); output / grad_output [N, C, D', H', W'].
#pragma once

#include "deepatlas/dtype.h"
#include "deepatlas/sampling.h"
#include "deepatlas/volume.h"

namespace deepatlas {

// grid [N, D', H', W', 3]: (x, y, z) normalised to [-1, 1] over the input's (W, H, D).
template <typename T, typename I>
struct GridCoords {
  Volume<const T, I> grid;
  I in_size[3];  // D, H, W of the input
  bool align_corners;

  // Voxel coordinates (z, y, x) of point q and d(voxel coordinate)/d(stored value) per axis.
  template <typename acc_t>
  DA_HD void read(const Point<I>& q, acc_t c[3], acc_t factor[3]) const {
    for (int k = 0; k < 3; ++k) {
      const acc_t g = to_acc<acc_t>(grid.at(q.n, q.z, q.y, q.x, 2 - k));
      c[k] = unnormalize_coord(g, in_size[k], align_corners, &factor[k]);
    }
  }

  template <typename G, typename acc_t>
  DA_HD void write_grad(const Volume<G, I>& out, const Point<I>& q, const acc_t g[3]) const {
    for (int k = 0; k < 3; ++k) out.at(q.n, q.z, q.y, q.x, 2 - k) = from_acc<G>(g[k]);
  }

  DA_HD bool reflect_align_corners() const { return align_corners; }
};

// ddf [N, 3, D, H, W]: displacement in voxels, channel k along axis k (D, H, W); location = p + u(p).
template <typename T, typename I>
struct DisplacementCoords {
  Volume<const T, I> ddf;

  template <typename acc_t>
  DA_HD void read(const Point<I>& q, acc_t c[3], acc_t factor[3]) const {
    const I base[3] = {q.z, q.y, q.x};
    for (int k = 0; k < 3; ++k) {
      c[k] = static_cast<acc_t>(base[k]) + to_acc<acc_t>(ddf.at(q.n, k, q.z, q.y, q.x));
      factor[k] = 1;
    }
  }

  template <typename G, typename acc_t>
  DA_HD void write_grad(const Volume<G, I>& out, const Point<I>& q, const acc_t g[3]) const {
    for (int k = 0; k < 3; ++k) out.at(q.n, k, q.z, q.y, q.x) = from_acc<G>(g[k]);
  }

  // The plain-PyTorch pipeline this matches samples with align_corners=True.
  DA_HD bool reflect_align_corners() const { return true; }
};

// The sampling location of one output point after padding, with the chain-rule factor
// d(location)/d(stored coordinate) per axis (z, y, x).
template <typename acc_t, typename I>
struct Location {
  acc_t c[3];
  acc_t dc[3];
};

template <typename acc_t, typename Coords, typename I>
DA_HD Location<acc_t, I> locate(const Coords& coords, const Point<I>& q, const I in_size[3], Padding padding) {
  Location<acc_t, I> loc;
  acc_t factor[3];
  coords.template read<acc_t>(q, loc.c, factor);
  for (int k = 0; k < 3; ++k) {
    acc_t pad_grad;
    loc.c[k] = pad_coord(loc.c[k], in_size[k], padding, coords.reflect_align_corners(), &pad_grad);
    loc.dc[k] = pad_grad * factor[k];
  }
  return loc;
}

template <typename I>
DA_HD I input_batch(I n, I input_batch_size) {
  return input_batch_size == 1 ? I(0) : n;
}

// Spatial sizes and strides of a volume, in (z, y, x) order.
template <typename T, typename I>
struct SpatialGeometry {
  I size[3];
  I stride[3];
  DA_HD explicit SpatialGeometry(const Volume<T, I>& v) {
    for (int k = 0; k < 3; ++k) {
      size[k] = v.size[2 + k];
      stride[k] = v.stride[2 + k];
    }
  }
};

// The 8 corner steps from corner 0 of an all-inside neighbourhood, computed once per loop rather than per corner read.
template <typename acc_t, typename I>
struct CornerSteps {
  I step[8];
  DA_HD explicit CornerSteps(const I stride[3]) {
    for (int k = 0; k < 8; ++k) step[k] = Trilinear<acc_t, I>::corner_step(k, stride);
  }
};

// One channel at an all-inside location: sum_k w[k] * value of corner k, first = corner 0 of that channel.
template <typename acc_t, typename TIn, typename I>
DA_HD acc_t interpolate_inside(const TIn* first, const CornerSteps<acc_t, I>& steps, const acc_t w[8]) {
  acc_t sum = 0;
  for (int k = 0; k < 8; ++k) sum += to_acc<acc_t>(first[steps.step[k]]) * w[k];
  return sum;
}

// The 8 corner values of one channel at an all-inside location.
template <typename acc_t, typename TIn, typename I>
DA_HD void gather_inside(const TIn* first, const CornerSteps<acc_t, I>& steps, acc_t v[8]) {
  for (int k = 0; k < 8; ++k) v[k] = to_acc<acc_t>(first[steps.step[k]]);
}

// The channels of a point with a corner outside the volume (outside corners count as 0): forward values, or the
// per-axis gradient sum_c grad_out[c] * d(out[c])/d(location). Out of line (DA_HD_COLD) so that the all-inside
// path stays lean; g++ otherwise merges both into one loop of flag-checked reads with spilled offsets. Such points
// are rare: the volume's border, or locations outside it.
template <typename acc_t, typename TIn, typename I>
DA_HD_COLD void forward_channels_edge(const Trilinear<acc_t, I>& t, const acc_t w[8], const TIn* base, I in_channel,
                                      TIn* dst, I out_channel, I channels) {
  for (I ch = 0; ch < channels; ++ch) {
    const TIn* plane = base + ch * in_channel;
    acc_t sum = 0;
    for (int k = 0; k < 8; ++k) {
      if (t.inside[k]) sum += to_acc<acc_t>(plane[t.offset[k]]) * w[k];
    }
    dst[ch * out_channel] = from_acc<TIn>(sum);
  }
}

template <typename acc_t, typename TIn, typename I>
DA_HD_COLD void coords_grad_channels_edge(const Trilinear<acc_t, I>& t, const TIn* base, I in_channel,
                                          const TIn* go_ptr, I go_channel, I channels, acc_t g[3]) {
  for (I ch = 0; ch < channels; ++ch) {
    const TIn* plane = base + ch * in_channel;
    const acc_t go = to_acc<acc_t>(go_ptr[ch * go_channel]);
    acc_t v[8];  // outside corners (offset 0) count as 0
    for (int k = 0; k < 8; ++k) v[k] = t.inside[k] ? to_acc<acc_t>(plane[t.offset[k]]) : acc_t(0);
    acc_t gc[3];
    t.gradient(v, gc);
    for (int axis = 0; axis < 3; ++axis) g[axis] += gc[axis] * go;
  }
}

// out[n, :, z, y, x] = input sampled at the location of q.
template <typename acc_t, typename Coords, typename TIn, typename I>
DA_HD void sample_forward_point(const Coords& coords, const Volume<const TIn, I>& input, const Volume<TIn, I>& out,
                                const Point<I>& q, Interp interp, Padding padding) {
  const SpatialGeometry<const TIn, I> geo(input);
  const I channels = input.size[1];
  const TIn* base = input.data + input_batch(q.n, input.size[0]) * input.stride[0];
  TIn* dst = &out.at(q.n, 0, q.z, q.y, q.x);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, padding);

  if (interp == Interp::Nearest) {
    const Nearest<acc_t, I> s(loc.c, geo.size, geo.stride);
    for (I ch = 0; ch < channels; ++ch) {
      dst[ch * out.stride[1]] = s.inside ? base[ch * input.stride[1] + s.offset] : from_acc<TIn>(acc_t(0));
    }
    return;
  }

  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  acc_t w[8];
  for (int k = 0; k < 8; ++k) w[k] = t.weight(k);
  if (!t.all_inside) {
    forward_channels_edge(t, w, base, input.stride[1], dst, out.stride[1], channels);
    return;
  }
  const CornerSteps<acc_t, I> steps(geo.stride);
  for (I ch = 0; ch < channels; ++ch) {
    dst[ch * out.stride[1]] = from_acc<TIn>(interpolate_inside(base + ch * input.stride[1] + t.offset[0], steps, w));
  }
}

// Gradient of sum_c grad_out[n, c, q] * out[n, c, q] with respect to the stored coordinates of q (a gather: reads
// input and grad_output only), written into grad_coords at q. Nearest mode has zero gradient.
template <typename acc_t, typename Coords, typename TIn, typename TGrad, typename I>
DA_HD void sample_backward_coords_point(const Coords& coords, const Volume<const TIn, I>& input,
                                        const Volume<const TIn, I>& grad_out, const Volume<TGrad, I>& grad_coords,
                                        const Point<I>& q, Interp interp, Padding padding) {
  acc_t g[3] = {0, 0, 0};
  if (interp == Interp::Bilinear) {
    const SpatialGeometry<const TIn, I> geo(input);
    const I channels = input.size[1];
    const TIn* base = input.data + input_batch(q.n, input.size[0]) * input.stride[0];
    const TIn* go_ptr = &grad_out.at(q.n, 0, q.z, q.y, q.x);
    const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, padding);
    const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
    if (!t.all_inside) {
      coords_grad_channels_edge(t, base, input.stride[1], go_ptr, grad_out.stride[1], channels, g);
    } else {
      const CornerSteps<acc_t, I> steps(geo.stride);
      for (I ch = 0; ch < channels; ++ch) {
        const acc_t go = to_acc<acc_t>(go_ptr[ch * grad_out.stride[1]]);
        acc_t v[8];
        gather_inside(base + ch * input.stride[1] + t.offset[0], steps, v);
        acc_t gc[3];
        t.gradient(v, gc);
        for (int axis = 0; axis < 3; ++axis) g[axis] += gc[axis] * go;
      }
    }
    for (int k = 0; k < 3; ++k) g[k] *= loc.dc[k];
  }
  coords.write_grad(grad_coords, q, g);
}

// Adds w[k] * go into the corners of t that lie inside the volume; plane: one channel of grad_input.
template <typename acc_t, typename TAcc, typename I, typename Add>
DA_HD void scatter_corners(const Trilinear<acc_t, I>& t, TAcc* plane, const acc_t w[8], acc_t go, Add add) {
  for (int k = 0; k < 8; ++k) {
    if (t.inside[k]) add(plane + t.offset[k], static_cast<TAcc>(w[k] * go));
  }
}

// Scatter grad_out[n, c, q] for channels [ch_begin, ch_end) into grad_input through add(pointer, value): plain
// addition on the CPU (each thread owns whole input planes), atomicAdd on CUDA.
template <typename acc_t, typename Coords, typename TIn, typename TAcc, typename I, typename Add>
DA_HD void sample_backward_input_point(const Coords& coords, const Volume<const TIn, I>& grad_out,
                                       const Volume<TAcc, I>& grad_input, const Point<I>& q, I ch_begin, I ch_end,
                                       Interp interp, Padding padding, Add add) {
  const SpatialGeometry<TAcc, I> geo(grad_input);
  TAcc* base = grad_input.data + input_batch(q.n, grad_input.size[0]) * grad_input.stride[0];
  const TIn* go_ptr = &grad_out.at(q.n, 0, q.z, q.y, q.x);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, padding);

  if (interp == Interp::Nearest) {
    const Nearest<acc_t, I> s(loc.c, geo.size, geo.stride);
    if (!s.inside) return;
    for (I ch = ch_begin; ch < ch_end; ++ch) {
      add(base + ch * grad_input.stride[1] + s.offset,
          static_cast<TAcc>(to_acc<acc_t>(go_ptr[ch * grad_out.stride[1]])));
    }
    return;
  }

  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  acc_t w[8];
  for (int k = 0; k < 8; ++k) w[k] = t.weight(k);
  for (I ch = ch_begin; ch < ch_end; ++ch) {
    scatter_corners(t, base + ch * grad_input.stride[1], w, to_acc<acc_t>(go_ptr[ch * grad_out.stride[1]]), add);
  }
}

}  // namespace deepatlas
