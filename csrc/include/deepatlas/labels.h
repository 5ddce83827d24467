// Per-point label warps through a displacement field (the warp convention: out[p] = labels[p + u(p)]), reading
// integer labels [N_in, 1, D, H, W] directly: no one-hot volume is ever built.
//   nearest: the label of the nearest voxel, `fill` outside the volume.
//   soft:    the trilinear warp of the one-hot encoding, out [N, K, D, H, W]: each point touches at most 8 labels.
// Label values outside [0, K) are ignored here (the op rejects them before launching).
#pragma once

#include "deepatlas/dtype.h"
#include "deepatlas/sampling.h"
#include "deepatlas/volume.h"
#include "deepatlas/warp.h"

namespace deepatlas {

// The label at a trilinear corner, or -1 when the corner is outside the volume or its label outside [0, classes).
template <typename acc_t, typename TL, typename I>
DA_HD int64_t corner_label(const Trilinear<acc_t, I>& t, const TL* base, int corner, I classes) {
  if (!t.inside[corner]) return -1;
  const int64_t label = static_cast<int64_t>(base[t.offset[corner]]);
  return label < classes ? label : -1;  // negative labels are already < 0
}

template <typename acc_t, typename Coords, typename TL, typename I>
DA_HD void warp_labels_nearest_point(const Coords& coords, const Volume<const TL, I>& labels,
                                     const Volume<TL, I>& out, const Point<I>& q, TL fill) {
  const SpatialGeometry<const TL, I> geo(labels);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Nearest<acc_t, I> s(loc.c, geo.size, geo.stride);
  const TL* base = labels.data + input_batch(q.n, labels.size[0]) * labels.stride[0];
  out.at(q.n, 0, q.z, q.y, q.x) = s.inside ? base[s.offset] : fill;
}

template <typename acc_t, typename Coords, typename TL, typename TO, typename I>
DA_HD void warp_labels_soft_point(const Coords& coords, const Volume<const TL, I>& labels, const Volume<TO, I>& out,
                                  const Point<I>& q) {
  const SpatialGeometry<const TL, I> geo(labels);
  const I classes = out.size[1];
  TO* dst = &out.at(q.n, 0, q.z, q.y, q.x);
  for (I k = 0; k < classes; ++k) dst[k * out.stride[1]] = from_acc<TO>(acc_t(0));
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const TL* base = labels.data + input_batch(q.n, labels.size[0]) * labels.stride[0];
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t label = corner_label(t, base, corner, classes);
    if (label < 0) continue;
    TO* cell = dst + label * out.stride[1];
    *cell = from_acc<TO>(to_acc<acc_t>(*cell) + t.weight(corner));
  }
}

// Gradient of sum_k grad_out[n, k, q] * out[n, k, q] with respect to the displacement at q: the trilinear gradient
// of the corner values grad_out[n, label(corner), q].
template <typename acc_t, typename Coords, typename TL, typename TO, typename TG, typename I>
DA_HD void warp_labels_soft_backward_point(const Coords& coords, const Volume<const TL, I>& labels,
                                           const Volume<const TO, I>& grad_out, const Volume<TG, I>& grad_ddf,
                                           const Point<I>& q) {
  const SpatialGeometry<const TL, I> geo(labels);
  const I classes = grad_out.size[1];
  const TO* go = &grad_out.at(q.n, 0, q.z, q.y, q.x);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const TL* base = labels.data + input_batch(q.n, labels.size[0]) * labels.stride[0];
  acc_t v[8];
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t label = corner_label(t, base, corner, classes);
    v[corner] = label < 0 ? acc_t(0) : to_acc<acc_t>(go[label * grad_out.stride[1]]);
  }
  acc_t g[3];
  t.gradient(v, g);
  for (int k = 0; k < 3; ++k) g[k] *= loc.dc[k];
  coords.write_grad(grad_ddf, q, g);
}

}  // namespace deepatlas
