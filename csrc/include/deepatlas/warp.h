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

// out[n, :, z, y, x] = input sampled at the location of q.
template <typename acc_t, typename Coords, typename TIn, typename I>
DA_HD void sample_forward_point(const Coords& coords, const Volume<const TIn, I>& input, const Volume<TIn, I>& out,
                                const Point<I>& q, Interp interp, Padding padding) {
  const I in_size[3] = {input.size[2], input.size[3], input.size[4]};
  const I channels = input.size[1];
  const I n_in = input_batch(q.n, input.size[0]);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, in_size, padding);

  if (interp == Interp::Nearest) {
    const I iz = static_cast<I>(da_nearbyint(loc.c[0]));
    const I iy = static_cast<I>(da_nearbyint(loc.c[1]));
    const I ix = static_cast<I>(da_nearbyint(loc.c[2]));
    const bool inside = in_range(iz, in_size[0]) && in_range(iy, in_size[1]) && in_range(ix, in_size[2]);
    for (I ch = 0; ch < channels; ++ch) {
      out.at(q.n, ch, q.z, q.y, q.x) = inside ? input.at(n_in, ch, iz, iy, ix) : from_acc<TIn>(acc_t(0));
    }
    return;
  }

  const Trilinear<acc_t, I> t(loc.c, in_size);
  for (I ch = 0; ch < channels; ++ch) {
    acc_t sum = 0;
    for (int dz = 0; dz < 2; ++dz) {
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (t.valid(0, dz) && t.valid(1, dy) && t.valid(2, dx)) {
            const acc_t w = t.weight(2, dx) * t.weight(1, dy) * t.weight(0, dz);
            sum += to_acc<acc_t>(input.at(n_in, ch, t.lo[0] + dz, t.lo[1] + dy, t.lo[2] + dx)) * w;
          }
        }
      }
    }
    out.at(q.n, ch, q.z, q.y, q.x) = from_acc<TIn>(sum);
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
    const I in_size[3] = {input.size[2], input.size[3], input.size[4]};
    const I channels = input.size[1];
    const I n_in = input_batch(q.n, input.size[0]);
    const Location<acc_t, I> loc = locate<acc_t>(coords, q, in_size, padding);
    const Trilinear<acc_t, I> t(loc.c, in_size);
    for (I ch = 0; ch < channels; ++ch) {
      const acc_t go = to_acc<acc_t>(grad_out.at(q.n, ch, q.z, q.y, q.x));
      for (int dz = 0; dz < 2; ++dz) {
        for (int dy = 0; dy < 2; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            if (!(t.valid(0, dz) && t.valid(1, dy) && t.valid(2, dx))) continue;
            const acc_t v = to_acc<acc_t>(input.at(n_in, ch, t.lo[0] + dz, t.lo[1] + dy, t.lo[2] + dx)) * go;
            // d(weight)/d(coordinate) along one axis is -1 for the lower neighbour and +1 for the upper.
            const acc_t sz = dz ? acc_t(1) : acc_t(-1);
            const acc_t sy = dy ? acc_t(1) : acc_t(-1);
            const acc_t sx = dx ? acc_t(1) : acc_t(-1);
            g[2] += sx * t.weight(1, dy) * t.weight(0, dz) * v;
            g[1] += sy * t.weight(2, dx) * t.weight(0, dz) * v;
            g[0] += sz * t.weight(2, dx) * t.weight(1, dy) * v;
          }
        }
      }
    }
    for (int k = 0; k < 3; ++k) g[k] *= loc.dc[k];
  }
  coords.write_grad(grad_coords, q, g);
}

// Scatter grad_out[n, c, q] for channels [ch_begin, ch_end) into grad_input through add(pointer, value): plain
// addition on the CPU (each thread owns whole input planes), atomicAdd on CUDA.
template <typename acc_t, typename Coords, typename TIn, typename TAcc, typename I, typename Add>
DA_HD void sample_backward_input_point(const Coords& coords, const Volume<const TIn, I>& grad_out,
                                       const Volume<TAcc, I>& grad_input, const Point<I>& q, I ch_begin, I ch_end,
                                       Interp interp, Padding padding, Add add) {
  const I in_size[3] = {grad_input.size[2], grad_input.size[3], grad_input.size[4]};
  const I n_in = input_batch(q.n, grad_input.size[0]);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, in_size, padding);

  if (interp == Interp::Nearest) {
    const I iz = static_cast<I>(da_nearbyint(loc.c[0]));
    const I iy = static_cast<I>(da_nearbyint(loc.c[1]));
    const I ix = static_cast<I>(da_nearbyint(loc.c[2]));
    if (!(in_range(iz, in_size[0]) && in_range(iy, in_size[1]) && in_range(ix, in_size[2]))) return;
    for (I ch = ch_begin; ch < ch_end; ++ch) {
      add(&grad_input.at(n_in, ch, iz, iy, ix), static_cast<TAcc>(to_acc<acc_t>(grad_out.at(q.n, ch, q.z, q.y, q.x))));
    }
    return;
  }

  const Trilinear<acc_t, I> t(loc.c, in_size);
  for (I ch = ch_begin; ch < ch_end; ++ch) {
    const acc_t go = to_acc<acc_t>(grad_out.at(q.n, ch, q.z, q.y, q.x));
    for (int dz = 0; dz < 2; ++dz) {
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!(t.valid(0, dz) && t.valid(1, dy) && t.valid(2, dx))) continue;
          const acc_t w = t.weight(2, dx) * t.weight(1, dy) * t.weight(0, dz);
          add(&grad_input.at(n_in, ch, t.lo[0] + dz, t.lo[1] + dy, t.lo[2] + dx), static_cast<TAcc>(w * go));
        }
      }
    }
  }
}

}  // namespace deepatlas
