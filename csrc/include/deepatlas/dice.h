// Per-point pieces of the fused warped soft Dice between warp(one_hot(source labels), ddf) and a target (integer
// labels or class probabilities). The warped K-channel volume never exists: at each point the warped one-hot has
// at most 8 non-zero classes (the labels of the trilinear corners), so the point adds to the per-class sums
//   I_k += a_k(x) b_k(x)   (intersection),   A_k += a_k(x)   (warped source),   B_k += b_k(x)   (target).
// sums is [3, K] for the point's batch element (rows I, A, B), accumulated in acc_t (double in both backends).
#pragma once

#include "deepatlas/dtype.h"
#include "deepatlas/labels.h"
#include "deepatlas/sampling.h"
#include "deepatlas/volume.h"
#include "deepatlas/warp.h"

namespace deepatlas {

// Target given as integer labels [N, 1, D, H, W]: b_k(x) = [label(x) == k].
template <typename TL, typename I>
struct LabelTarget {
  Volume<const TL, I> labels;
  DA_HD int64_t label_at(const Point<I>& q) const {
    return static_cast<int64_t>(labels.at(q.n, 0, q.z, q.y, q.x));
  }
  template <typename acc_t>
  DA_HD acc_t prob(const Point<I>& q, int64_t k) const {
    return label_at(q) == k ? acc_t(1) : acc_t(0);
  }
  template <typename acc_t, typename Add>
  DA_HD void add_target_sums(const Point<I>& q, I classes, acc_t* sums_b, Add add) const {
    const int64_t k = label_at(q);
    if (k >= 0 && k < classes) add(&sums_b[k], acc_t(1));
  }
};

// Target given as probabilities [N, K, D, H, W].
template <typename T, typename I>
struct ProbTarget {
  Volume<const T, I> probs;
  template <typename acc_t>
  DA_HD acc_t prob(const Point<I>& q, int64_t k) const {
    return to_acc<acc_t>(probs.at(q.n, static_cast<I>(k), q.z, q.y, q.x));
  }
  template <typename acc_t, typename Add>
  DA_HD void add_target_sums(const Point<I>& q, I classes, acc_t* sums_b, Add add) const {
    for (I k = 0; k < classes; ++k) add(&sums_b[k], prob<acc_t>(q, k));
  }
};

// Adds point q's contributions to sums ([3, K]: rows I, A, B) through add(pointer, value).
template <typename acc_t, typename Coords, typename TL, typename Target, typename I, typename Add>
DA_HD void warped_dice_point(const Coords& coords, const Volume<const TL, I>& source, const Target& target,
                             const Point<I>& q, I classes, acc_t* sums, Add add) {
  const SpatialGeometry<const TL, I> geo(source);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const TL* base = source.data + input_batch(q.n, source.size[0]) * source.stride[0];
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t label = corner_label(t, base, corner, classes);
    if (label < 0) continue;
    const acc_t w = t.weight(corner);
    add(&sums[label], w * target.template prob<acc_t>(q, label));
    add(&sums[classes + label], w);
  }
  target.template add_target_sums<acc_t>(q, classes, sums + 2 * classes, add);
}

// Backward at point q, given the gradients of the loss with respect to the sums, grad_sums [3, K]:
//   d/d a_k(x) = gI_k b_k(x) + gA_k  -> the ddf gradient through the trilinear weights;
//   d/d b_k(x) = gI_k a_k(x) + gB_k  -> the target gradient (probability targets), written for every class.
template <typename acc_t, typename Coords, typename TL, typename Target, typename TG, typename I>
DA_HD void warped_dice_backward_point(const Coords& coords, const Volume<const TL, I>& source, const Target& target,
                                      const Point<I>& q, I classes, const acc_t* grad_sums,
                                      const Volume<TG, I>& grad_ddf, const Volume<TG, I>& grad_target) {
  const SpatialGeometry<const TL, I> geo(source);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const TL* base = source.data + input_batch(q.n, source.size[0]) * source.stride[0];
  const acc_t* g_i = grad_sums;
  const acc_t* g_a = grad_sums + classes;
  const acc_t* g_b = grad_sums + 2 * classes;
  TG* target_grad = grad_target.data != nullptr ? &grad_target.at(q.n, 0, q.z, q.y, q.x) : nullptr;
  if (target_grad != nullptr) {
    for (I k = 0; k < classes; ++k) target_grad[k * grad_target.stride[1]] = from_acc<TG>(g_b[k]);
  }
  acc_t v[8];
  for (int corner = 0; corner < 8; ++corner) {
    v[corner] = 0;
    const int64_t label = corner_label(t, base, corner, classes);
    if (label < 0) continue;
    v[corner] = g_i[label] * target.template prob<acc_t>(q, label) + g_a[label];
    if (target_grad != nullptr) {
      TG* cell = target_grad + label * grad_target.stride[1];
      *cell = from_acc<TG>(to_acc<acc_t>(*cell) + g_i[label] * t.weight(corner));
    }
  }
  if (grad_ddf.data != nullptr) {
    acc_t g[3];
    t.gradient(v, g);
    for (int k = 0; k < 3; ++k) g[k] *= loc.dc[k];
    coords.write_grad(grad_ddf, q, g);
  }
}

}  // namespace deepatlas
