// Per-voxel Jacobian determinant of x -> x + u(x) for a displacement field u [N, 3, D, H, W] (channel i along
// axis i), and its gradient as a gather (deterministic: each voxel sums the contributions of the voxels whose
// finite-difference stencils read it, in a fixed order, no atomics).
//
// J[i][j] = delta_ij + du_i/dx_j, with du_i/dx_j = (u_i(hi) - u_i(lo)) / ((hi - lo) * spacing_j) where (lo, hi)
// are the stencil's two samples along axis j:
//
//   index:      0     1     2    ...   n-2   n-1
//   central:  [0,1] [0,2] [1,3]  ...  [n-3,n-1] [n-2,n-1]   one-sided at both ends
//   forward:  [0,1] [1,2] [2,3]  ...  [n-2,n-1] [n-2,n-1]   backward difference at the last voxel
//   backward: [0,1] [0,1] [1,2]  ...  [n-3,n-2] [n-2,n-1]   forward difference at the first voxel
//
// An axis of length 1 has derivative 0. u is read in the units of `spacing` (voxels when spacing = 1).
//
// Backward in two passes, both built from the functions below:
//   1. coefficients: G_q[i][j] = grad_out[q] * d det(J(q)) / d (u_i(hi_j(q)) - u_i(lo_j(q)))
//                              = grad_out[q] * cofactor(J(q))[i][j] * scale_j(q),   scale = 1 / ((hi - lo) * spacing)
//      stored as 9 channels c = 3 i + j (CUDA: a [N, 9, D, H, W] buffer; CPU: a rolling ring of 3 z-planes per
//      thread, recomputed at chunk borders, so the values do not depend on the thread count);
//   2. gather: grad_u_i(p) = sum_j sum_{o = -1, 0, 1} w_j(p, o) * G_{p + o e_j}[i][j], with w = +1 where p is the
//      stencil's hi sample, -1 where it is its lo sample, 0 otherwise (fd_adjoint_weights). Away from the borders
//      exactly two terms per axis survive: +G at p - dhi e_j and -G at p - dlo e_j (fd_interior_offsets), which is
//      jacobian_det_gather_interior; it gives the same bits as the general jacobian_det_gather.
#pragma once

#include "deepatlas/dtype.h"
#include "deepatlas/sample_args.h"
#include "deepatlas/volume.h"

namespace deepatlas {

template <typename I>
struct FDStencil {
  I lo;
  I hi;
};

template <typename I>
DA_HD FDStencil<I> fd_stencil(I i, I n, FDScheme scheme) {
  if (n < 2) return {i, i};
  I lo = scheme == FDScheme::Forward ? i : i - 1;
  I hi = scheme == FDScheme::Backward ? i : i + 1;
  if (lo < 0) {
    lo = 0;
    hi = 1;
  }
  if (hi > n - 1) {
    lo = n - 2;
    hi = n - 1;
  }
  return {lo, hi};
}

// The stencil's offsets (lo - i, hi - i) away from the borders.
DA_HD void fd_interior_offsets(FDScheme scheme, int& dlo, int& dhi) {
  dlo = scheme == FDScheme::Forward ? 0 : -1;
  dhi = scheme == FDScheme::Backward ? 0 : 1;
}

// True when voxel i's stencil is the interior one (no one-sided fallback, axis longer than 1).
template <typename I>
DA_HD bool fd_is_interior(I i, I n, FDScheme scheme) {
  int dlo, dhi;
  fd_interior_offsets(scheme, dlo, dhi);
  const FDStencil<I> s = fd_stencil(i, n, scheme);
  return n >= 2 && s.lo == i + dlo && s.hi == i + dhi;
}

// w[o] = the weight with which u(p) enters the difference u(hi) - u(lo) of the stencil of voxel q = p + o - 1
// along an axis of length n: +1 when p is its hi sample, -1 when p is its lo sample, 0 otherwise or when q lies
// outside the axis.
template <typename I>
DA_HD void fd_adjoint_weights(I p, I n, FDScheme scheme, int w[3]) {
  for (int o = 0; o < 3; ++o) {
    const I q = p + o - 1;
    w[o] = 0;
    if (q < 0 || q >= n) continue;
    const FDStencil<I> s = fd_stencil(q, n, scheme);
    if (s.hi == s.lo) continue;
    w[o] = (s.hi == p ? 1 : 0) - (s.lo == p ? 1 : 0);
  }
}

// True when fd_adjoint_weights(p) is the interior pattern: +1 at q = p - dhi, -1 at q = p - dlo, 0 elsewhere.
template <typename I>
DA_HD bool fd_adjoint_is_interior(I p, I n, FDScheme scheme) {
  int dlo, dhi, w[3];
  fd_interior_offsets(scheme, dlo, dhi);
  fd_adjoint_weights(p, n, scheme, w);
  for (int o = 0; o < 3; ++o) {
    const int expected = (o - 1 == -dhi ? 1 : 0) - (o - 1 == -dlo ? 1 : 0);
    if (w[o] != expected) return false;
  }
  return true;
}

template <typename acc_t>
struct JacobianParams {
  acc_t inv_spacing[3];
  FDScheme scheme[3];
};

// One axis's stencil at voxel index i as element offsets from the voxel (stride = the axis's stride) and the scale
// 1 / ((hi - lo) * spacing) (0 on an axis of length 1, whose offsets are both 0).
template <typename acc_t, typename I>
struct AxisTap {
  I lo;
  I hi;
  acc_t scale;
};

template <typename acc_t, typename I>
DA_HD AxisTap<acc_t, I> axis_tap(I i, I n, I stride, FDScheme scheme, acc_t inv_spacing) {
  const FDStencil<I> s = fd_stencil(i, n, scheme);
  const acc_t scale = s.hi == s.lo ? acc_t(0) : inv_spacing / static_cast<acc_t>(s.hi - s.lo);
  return {(s.lo - i) * stride, (s.hi - i) * stride, scale};
}

// J from the ddf at one voxel: u points at channel 0 of the voxel, channels cs apart; lo[j] / hi[j] are the
// element offsets of axis j's stencil samples and scale[j] its scale (axis_tap).
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_from_samples(const T* u, I cs, const I lo[3], const I hi[3], const acc_t scale[3],
                                 acc_t J[3][3]) {
  for (int j = 0; j < 3; ++j) {
    for (int i = 0; i < 3; ++i) {
      const acc_t diff = to_acc<acc_t>(u[i * cs + hi[j]]) - to_acc<acc_t>(u[i * cs + lo[j]]);
      J[i][j] = (i == j ? acc_t(1) : acc_t(0)) + diff * scale[j];
    }
  }
}

template <typename acc_t>
DA_HD acc_t det3(const acc_t J[3][3]) {
  return J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1]) - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0]) +
         J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]);
}

// C[i][j] = d det(J) / d J[i][j] (the cofactor matrix, the transpose of the adjugate).
template <typename acc_t>
DA_HD void cofactor3(const acc_t J[3][3], acc_t C[3][3]) {
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const int i1 = (i + 1) % 3, i2 = (i + 2) % 3, j1 = (j + 1) % 3, j2 = (j + 2) % 3;
      C[i][j] = J[i1][j1] * J[i2][j2] - J[i1][j2] * J[i2][j1];
    }
  }
}

// det(J) of one voxel: u, cs, lo, hi, scale as in jacobian_from_samples.
template <typename acc_t, typename T, typename I>
DA_HD acc_t jacobian_det_from_samples(const T* u, I cs, const I lo[3], const I hi[3], const acc_t scale[3]) {
  acc_t J[3][3];
  jacobian_from_samples(u, cs, lo, hi, scale, J);
  return det3(J);
}

// Backward pass 1 at one voxel q: G[c] (c = 3 i + j, written to coefficients[c * out_cs]) = g * cofactor[i][j] *
// scale[j], the gradient of g * det(J(q)) with respect to the difference u_i(hi_j) - u_i(lo_j).
template <typename acc_t, typename T, typename I, typename K>
DA_HD void jacobian_det_coefficients(const T* u, I cs, const I lo[3], const I hi[3], const acc_t scale[3], acc_t g,
                                     acc_t* coefficients, K out_cs) {
  acc_t J[3][3], C[3][3];
  jacobian_from_samples(u, cs, lo, hi, scale, J);
  cofactor3(J, C);
  const acc_t gs[3] = {g * scale[0], g * scale[1], g * scale[2]};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) coefficients[(3 * i + j) * out_cs] = C[i][j] * gs[j];
  }
}

// Backward pass 2 at one voxel p, general form: nb[j][o] points at channel 0 of the coefficients of voxel
// p + (o - 1) e_j (channels cs apart; never read where w[j][o] = 0, so it may be null there), w[j] =
// fd_adjoint_weights along axis j.
template <typename acc_t, typename I>
DA_HD void jacobian_det_gather(const acc_t* const nb[3][3], I cs, const int w[3][3], acc_t grad[3]) {
  for (int i = 0; i < 3; ++i) {
    acc_t total = 0;
    for (int j = 0; j < 3; ++j) {
      acc_t axis_sum = 0;
      for (int o = 0; o < 3; ++o) {
        if (w[j][o] != 0) axis_sum += static_cast<acc_t>(w[j][o]) * nb[j][o][(3 * i + j) * cs];
      }
      total += axis_sum;
    }
    grad[i] = total;
  }
}

// Backward pass 2 at a voxel p whose weights are the interior pattern along every axis (fd_adjoint_is_interior):
// hi_nb[j] / lo_nb[j] point at channel 0 of the coefficients of p - dhi_j e_j / p - dlo_j e_j. Same bits as
// jacobian_det_gather.
template <typename acc_t, typename I>
DA_HD void jacobian_det_gather_interior(const acc_t* const hi_nb[3], const acc_t* const lo_nb[3], I cs,
                                        acc_t grad[3]) {
  for (int i = 0; i < 3; ++i) {
    acc_t total = 0;
    for (int j = 0; j < 3; ++j) total += hi_nb[j][(3 * i + j) * cs] - lo_nb[j][(3 * i + j) * cs];
    grad[i] = total;
  }
}

// The stencils of all three axes at voxel pos = (z, y, x) of a volume with spatial sizes / strides size[2..4] /
// stride[2..4].
template <typename acc_t, typename T, typename I>
DA_HD void voxel_taps(const Volume<T, I>& v, const I pos[3], const JacobianParams<acc_t>& params, I lo[3], I hi[3],
                      acc_t scale[3]) {
  for (int j = 0; j < 3; ++j) {
    const AxisTap<acc_t, I> t = axis_tap(pos[j], v.size[2 + j], v.stride[2 + j], params.scheme[j],
                                         params.inv_spacing[j]);
    lo[j] = t.lo;
    hi[j] = t.hi;
    scale[j] = t.scale;
  }
}

// Whole-voxel forms on strided volumes (the CUDA kernels; the CPU path uses them at the borders through the
// functions above).
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_det_point(const Volume<const T, I>& ddf, const Volume<T, I>& out, const Point<I>& q,
                              const JacobianParams<acc_t>& params) {
  const I pos[3] = {q.z, q.y, q.x};
  I lo[3], hi[3];
  acc_t scale[3];
  voxel_taps(ddf, pos, params, lo, hi, scale);
  out.at(q.n, 0, q.z, q.y, q.x) =
      from_acc<T>(jacobian_det_from_samples(&ddf.at(q.n, 0, q.z, q.y, q.x), ddf.stride[1], lo, hi, scale));
}

// Pass 1 into coefficients [N, 9, D, H, W] (any strides).
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_det_coefficients_point(const Volume<const T, I>& ddf, const Volume<const T, I>& grad_out,
                                           const Volume<acc_t, I>& coefficients, const Point<I>& q,
                                           const JacobianParams<acc_t>& params) {
  const I pos[3] = {q.z, q.y, q.x};
  I lo[3], hi[3];
  acc_t scale[3];
  voxel_taps(ddf, pos, params, lo, hi, scale);
  jacobian_det_coefficients(&ddf.at(q.n, 0, q.z, q.y, q.x), ddf.stride[1], lo, hi, scale,
                            to_acc<acc_t>(grad_out.at(q.n, 0, q.z, q.y, q.x)), &coefficients.at(q.n, 0, q.z, q.y, q.x),
                            coefficients.stride[1]);
}

// Pass 2 from coefficients [N, 9, D, H, W] (any strides) into grad_ddf.
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_det_gather_point(const Volume<const acc_t, I>& coefficients, const Volume<T, I>& grad_ddf,
                                     const Point<I>& p, const JacobianParams<acc_t>& params) {
  const I pos[3] = {p.z, p.y, p.x};
  const acc_t* here = &coefficients.at(p.n, 0, p.z, p.y, p.x);
  int w[3][3];
  const acc_t* nb[3][3];
  for (int j = 0; j < 3; ++j) {
    fd_adjoint_weights(pos[j], coefficients.size[2 + j], params.scheme[j], w[j]);
    for (int o = 0; o < 3; ++o) nb[j][o] = w[j][o] != 0 ? here + (o - 1) * coefficients.stride[2 + j] : nullptr;
  }
  acc_t grad[3];
  jacobian_det_gather(nb, coefficients.stride[1], w, grad);
  for (int i = 0; i < 3; ++i) grad_ddf.at(p.n, i, p.z, p.y, p.x) = from_acc<T>(grad[i]);
}

}  // namespace deepatlas
