// Per-voxel Jacobian determinant of x -> x + u(x) for a displacement field u [N, 3, D, H, W] (channel i along
// axis i), and its gradient as a gather (deterministic: each voxel sums the contributions of the voxels whose
// finite-difference stencils read it).
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

template <typename acc_t>
struct JacobianParams {
  acc_t inv_spacing[3];
  FDScheme scheme[3];
};

// J at voxel pos = (z, y, x) of batch n.
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_at(const Volume<const T, I>& ddf, I n, const I pos[3], const JacobianParams<acc_t>& params,
                       acc_t J[3][3]) {
  for (int j = 0; j < 3; ++j) {
    const FDStencil<I> s = fd_stencil(pos[j], ddf.size[2 + j], params.scheme[j]);
    I a[3] = {pos[0], pos[1], pos[2]};
    I b[3] = {pos[0], pos[1], pos[2]};
    a[j] = s.lo;
    b[j] = s.hi;
    const acc_t scale = s.hi == s.lo ? acc_t(0) : params.inv_spacing[j] / static_cast<acc_t>(s.hi - s.lo);
    for (int i = 0; i < 3; ++i) {
      const acc_t diff =
          to_acc<acc_t>(ddf.at(n, i, b[0], b[1], b[2])) - to_acc<acc_t>(ddf.at(n, i, a[0], a[1], a[2]));
      J[i][j] = (i == j ? acc_t(1) : acc_t(0)) + diff * scale;
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

template <typename acc_t, typename T, typename I>
DA_HD void jacobian_det_point(const Volume<const T, I>& ddf, const Volume<T, I>& out, const Point<I>& q,
                              const JacobianParams<acc_t>& params) {
  const I pos[3] = {q.z, q.y, q.x};
  acc_t J[3][3];
  jacobian_at(ddf, q.n, pos, params, J);
  out.at(q.n, 0, q.z, q.y, q.x) = from_acc<T>(det3(J));
}

// grad_ddf[n, :, p] = sum over voxels q whose stencils read p of grad_out[q] * d det(J(q)) / d u(p). Only
// q = p and its six face neighbours can read p.
template <typename acc_t, typename T, typename I>
DA_HD void jacobian_det_backward_point(const Volume<const T, I>& ddf, const Volume<const T, I>& grad_out,
                                       const Volume<T, I>& grad_ddf, const Point<I>& p,
                                       const JacobianParams<acc_t>& params) {
  const I pos[3] = {p.z, p.y, p.x};
  acc_t grad[3] = {0, 0, 0};
  acc_t J[3][3];
  acc_t C_here[3][3];
  jacobian_at(ddf, p.n, pos, params, J);
  cofactor3(J, C_here);
  const acc_t g_here = to_acc<acc_t>(grad_out.at(p.n, 0, p.z, p.y, p.x));
  for (int j = 0; j < 3; ++j) {
    const I n_j = ddf.size[2 + j];
    for (int o = -1; o <= 1; ++o) {
      I qpos[3] = {pos[0], pos[1], pos[2]};
      qpos[j] = pos[j] + o;
      if (qpos[j] < 0 || qpos[j] >= n_j) continue;
      const FDStencil<I> s = fd_stencil(qpos[j], n_j, params.scheme[j]);
      if (s.hi == s.lo) continue;
      const int weight = (s.hi == pos[j] ? 1 : 0) - (s.lo == pos[j] ? 1 : 0);
      if (weight == 0) continue;
      const acc_t coefficient = weight * params.inv_spacing[j] / static_cast<acc_t>(s.hi - s.lo);
      acc_t C_there[3][3];
      const acc_t(*C)[3] = C_here;
      acc_t g = g_here;
      if (o != 0) {
        jacobian_at(ddf, p.n, qpos, params, J);
        cofactor3(J, C_there);
        C = C_there;
        g = to_acc<acc_t>(grad_out.at(p.n, 0, qpos[0], qpos[1], qpos[2]));
      }
      for (int i = 0; i < 3; ++i) grad[i] += g * C[i][j] * coefficient;
    }
  }
  for (int i = 0; i < 3; ++i) grad_ddf.at(p.n, i, p.z, p.y, p.x) = from_acc<T>(grad[i]);
}

}  // namespace deepatlas
