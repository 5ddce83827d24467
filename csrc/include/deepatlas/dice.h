// Per-point pieces of the fused warped soft Dice between a = warp(source, ddf) (trilinear, zeros outside) and a
// target b (integer labels or class probabilities). The warped K-channel volume never exists: each point adds to
// the per-class sums
//   I_k += a_k(x) b_k(x)   (intersection),   A_k += a_k(x)   (warped source),   B_k += b_k(x)   (target).
// sums is [3, K] for the point's batch element (rows I, A, B), accumulated in acc_t (double in both backends).
// The source is either
//   - integer labels [N_in, 1, D, H, W] (a plain Volume): a = the warp of the one-hot encoding, so a point has at
//     most 8 non-zero classes (the labels of its trilinear corners); or
//   - probabilities P [N_in, K, D, H, W] (ProbSource): a_k(x) = sum_c w_c(x) P_k(corner c), differentiable in P.
// N_in = N or 1 (broadcast over the batch).
#pragma once

#include <type_traits>

#include "deepatlas/dtype.h"
#include "deepatlas/labels.h"
#include "deepatlas/sample_dispatch.h"
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

// Source given as probabilities [N_in, K, D, H, W] in the ddf's dtype.
template <typename T, typename I>
struct ProbSource {
  Volume<const T, I> probs;
};

// The trilinear weights of the 8 corners, 0 for corners outside the volume (their offset is 0, a valid address).
template <typename acc_t, typename I>
DA_HD void inside_weights(const Trilinear<acc_t, I>& t, acc_t w[8]) {
  for (int corner = 0; corner < 8; ++corner) w[corner] = t.inside[corner] ? t.weight(corner) : acc_t(0);
}

// Corner values of one class plane, 0 outside (so that a NaN or inf stored at offset 0 never leaks in).
template <typename acc_t, typename T, typename I>
DA_HD void corner_values(const Trilinear<acc_t, I>& t, const T* plane, acc_t v[8]) {
  for (int corner = 0; corner < 8; ++corner) {
    v[corner] = (t.all_inside || t.inside[corner]) ? to_acc<acc_t>(plane[t.offset[corner]]) : acc_t(0);
  }
}

// Forward for a probability source: a_k(x) for every class from the 8 corners of the location.
template <typename acc_t, typename Coords, typename T, typename Target, typename I, typename Add>
DA_HD void warped_dice_point(const Coords& coords, const ProbSource<T, I>& source, const Target& target,
                             const Point<I>& q, I classes, acc_t* sums, Add add) {
  const SpatialGeometry<const T, I> geo(source.probs);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const T* base = source.probs.data + input_batch(q.n, source.probs.size[0]) * source.probs.stride[0];
  acc_t w[8];
  inside_weights(t, w);
  bool any_inside = false;
  for (int corner = 0; corner < 8; ++corner) any_inside = any_inside || t.inside[corner];
  if (any_inside) {
    for (I k = 0; k < classes; ++k) {
      acc_t v[8];
      corner_values(t, base + k * source.probs.stride[1], v);
      acc_t a = 0;
      for (int corner = 0; corner < 8; ++corner) a += v[corner] * w[corner];
      if (a == acc_t(0)) continue;  // adds nothing (and saves two atomics on CUDA)
      add(&sums[k], a * target.template prob<acc_t>(q, k));
      add(&sums[classes + k], a);
    }
  }
  target.template add_target_sums<acc_t>(q, classes, sums + 2 * classes, add);
}

// Backward for a probability source, the gathers at point q (no scatter): with c_k(x) = gI_k b_k(x) + gA_k,
//   grad ddf  = the trilinear gradient of the corner values v[c] = sum_k c_k(x) P_k(c);
//   grad b_k  = gI_k a_k(x) + gB_k  (probability targets; every class written).
// The source gradient is the scatter warped_dice_source_grad_point.
template <typename acc_t, typename Coords, typename T, typename Target, typename TG, typename I>
DA_HD void warped_dice_backward_point(const Coords& coords, const ProbSource<T, I>& source, const Target& target,
                                      const Point<I>& q, I classes, const acc_t* grad_sums,
                                      const Volume<TG, I>& grad_ddf, const Volume<TG, I>& grad_target) {
  const SpatialGeometry<const T, I> geo(source.probs);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  const T* base = source.probs.data + input_batch(q.n, source.probs.size[0]) * source.probs.stride[0];
  const acc_t* g_i = grad_sums;
  const acc_t* g_a = grad_sums + classes;
  const acc_t* g_b = grad_sums + 2 * classes;
  TG* target_grad = grad_target.data != nullptr ? &grad_target.at(q.n, 0, q.z, q.y, q.x) : nullptr;
  const bool want_ddf = grad_ddf.data != nullptr;
  acc_t w[8];
  inside_weights(t, w);
  acc_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (I k = 0; k < classes; ++k) {
    acc_t p[8];
    corner_values(t, base + k * source.probs.stride[1], p);
    if (want_ddf) {
      const acc_t c = g_i[k] * target.template prob<acc_t>(q, k) + g_a[k];
      for (int corner = 0; corner < 8; ++corner) v[corner] += c * p[corner];
    }
    if (target_grad != nullptr) {
      acc_t a = 0;
      for (int corner = 0; corner < 8; ++corner) a += p[corner] * w[corner];
      target_grad[k * grad_target.stride[1]] = from_acc<TG>(g_i[k] * a + g_b[k]);
    }
  }
  if (want_ddf) {
    acc_t g[3];
    t.gradient(v, g);
    for (int k = 0; k < 3; ++k) g[k] *= loc.dc[k];
    coords.write_grad(grad_ddf, q, g);
  }
}

// Source-gradient scatter of point q for classes [k_begin, k_end): dP_k(c) += w_c(x) (gI_k b_k(x) + gA_k) through
// add(pointer, value). grad_source [N_in, K, D, H, W] (spatially shaped like the source; the CPU passes a one-batch
// view of the plane range it owns, so size[0] = 1 there). Plain addition on the CPU (each thread owns whole class
// planes and visits points in a fixed order), atomicAdd on CUDA.
template <typename acc_t, typename Coords, typename Target, typename TG, typename I, typename Add>
DA_HD void warped_dice_source_grad_point(const Coords& coords, const Target& target, const Point<I>& q,
                                         I classes, const acc_t* grad_sums, const Volume<TG, I>& grad_source,
                                         I k_begin, I k_end, Add add) {
  const SpatialGeometry<TG, I> geo(grad_source);
  const Location<acc_t, I> loc = locate<acc_t>(coords, q, geo.size, Padding::Zeros);
  const Trilinear<acc_t, I> t(loc.c, geo.size, geo.stride);
  bool any_inside = false;
  for (int corner = 0; corner < 8; ++corner) any_inside = any_inside || t.inside[corner];
  if (!any_inside) return;
  acc_t w[8];
  inside_weights(t, w);
  TG* base = grad_source.data + input_batch(q.n, grad_source.size[0]) * grad_source.stride[0];
  const acc_t* g_i = grad_sums;
  const acc_t* g_a = grad_sums + classes;
  for (I k = k_begin; k < k_end; ++k) {
    const acc_t c = g_i[k] * target.template prob<acc_t>(q, k) + g_a[k];
    if (c == acc_t(0)) continue;
    TG* plane = base + k * grad_source.stride[1];
    for (int corner = 0; corner < 8; ++corner) {
      if (t.inside[corner]) add(plane + t.offset[corner], from_acc<TG>(w[corner] * c));
    }
  }
}

template <typename S>
struct IsProbSource : std::false_type {};
template <typename T, typename I>
struct IsProbSource<ProbSource<T, I>> : std::true_type {};

// Host side, shared by the CPU loops and the CUDA launchers: f(TypeTag<float type>, TypeTag<index>, source, target)
// with source a label Volume or a ProbSource and target a LabelTarget or ProbTarget view of args. A label source
// and a label target share one dtype; a probability source takes a label target of any label dtype.
template <typename F>
void dispatch_dice(const DiceArgs& args, F&& f) {
  const SampleArgs& s = args.sample;
  auto with_float = [&](auto index_tag, auto&& g) {
    if (s.coords.dtype == DType::Float64) {
      g(TypeTag<double>{}, index_tag);
    } else {
      g(TypeTag<float>{}, index_tag);
    }
  };
  if (args.source_is_labels) {
    dispatch_label_types(s, [&](auto label_tag, auto float_tag, auto index_tag) {
      using TL = typename decltype(label_tag)::type;
      using T = typename decltype(float_tag)::type;
      using I = typename decltype(index_tag)::type;
      const auto source = make_volume<const TL, I>(s.input);
      if (args.target_is_labels) {
        f(float_tag, index_tag, source, LabelTarget<TL, I>{make_volume<const TL, I>(args.target)});
      } else {
        f(float_tag, index_tag, source, ProbTarget<T, I>{make_volume<const T, I>(args.target)});
      }
    });
    return;
  }
  dispatch_index(s.index64, [&](auto index_tag) {
    with_float(index_tag, [&](auto float_tag, auto index_tag2) {
      using T = typename decltype(float_tag)::type;
      using I = typename decltype(index_tag2)::type;
      const ProbSource<T, I> source{make_volume<const T, I>(s.input)};
      if (args.target_is_labels) {
        dispatch_label_dtype(args.target.dtype, [&](auto label_tag) {
          using TL = typename decltype(label_tag)::type;
          f(float_tag, index_tag2, source, LabelTarget<TL, I>{make_volume<const TL, I>(args.target)});
        });
      } else {
        f(float_tag, index_tag2, source, ProbTarget<T, I>{make_volume<const T, I>(args.target)});
      }
    });
  });
}

}  // namespace deepatlas
