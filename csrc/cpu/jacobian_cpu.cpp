// CPU backend of jacobian_det: loops over rows and z-planes -> the per-voxel math of deepatlas/jacobian.h.
//
// Forward: parallel over rows (n, z, y); the stencils of z and y are set once per row, and the voxels whose x
// stencil is the interior one run in a tight loop with fixed offsets (the row's first and last few voxels take
// their own stencils).
//
// Backward: parallel over chunks of z-planes; each thread keeps a ring of 3 planes of the 9 gradient coefficients
// (jacobian.h, pass 1) and, per plane z, computes plane z + 1 and then gathers plane z (pass 2). A chunk also
// computes the plane before it (its neighbour's last), so every coefficient is computed by the same function from
// the same inputs whatever the chunking: the result is bit-identical for any thread count, with no atomics and
// 27 planes of memory per thread.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "deepatlas/jacobian.h"
#include "deepatlas/sample_dispatch.h"
#include "jacobian_glue.h"

namespace deepatlas {
namespace {

// Rows / planes per task at the least.
constexpr int64_t kVoxelGrain = 4096;
constexpr int64_t kPlaneGrain = 8;

// [begin, end) of the indices of an axis of length n for which `interior(i)` holds: a contiguous range (the
// one-sided stencils sit at the ends only), empty when there is none.
template <typename I, typename F>
void interior_range(I n, const F& interior, I& begin, I& end) {
  begin = 0;
  while (begin < n && !interior(begin)) ++begin;
  end = n;
  while (end > begin && !interior(end - 1)) --end;
}

template <typename T, typename I>
struct JacobianCpu {
  using acc_t = typename AccType<T>::type;

  Volume<const T, I> ddf;  // [N, 3, D, H, W], unit stride along x (jacobian_glue.h)
  JacobianParams<acc_t> params;
  I D, H, W;

  explicit JacobianCpu(const JacobianArgs& a) : ddf(make_volume<const T, I>(a.sample.coords)) {
    for (int k = 0; k < 3; ++k) {
      params.inv_spacing[k] = static_cast<acc_t>(1.0 / a.spacing[k]);
      params.scheme[k] = a.scheme[k];
    }
    D = ddf.size[2];
    H = ddf.size[3];
    W = ddf.size[4];
    TORCH_INTERNAL_ASSERT(W < 2 || ddf.stride[4] == 1, "jacobian_det: ddf must have unit stride along W");
  }

  AxisTap<acc_t, I> tap(int axis, I i) const {
    return axis_tap(i, ddf.size[2 + axis], axis == 2 ? I(1) : ddf.stride[2 + axis], params.scheme[axis],
                    params.inv_spacing[axis]);
  }

  // Calls fn(x, lo, hi, scale) for every x of a row whose z / y stencils are tz / ty, the interior x in one tight
  // loop with the same (lo, hi, scale).
  template <typename F>
  void for_each_x(const AxisTap<acc_t, I>& tz, const AxisTap<acc_t, I>& ty, I xb, I xe, const F& fn) const {
    I lo[3] = {tz.lo, ty.lo, 0}, hi[3] = {tz.hi, ty.hi, 0};
    acc_t scale[3] = {tz.scale, ty.scale, 0};
    const auto border = [&](I x) {
      const AxisTap<acc_t, I> tx = tap(2, x);
      lo[2] = tx.lo;
      hi[2] = tx.hi;
      scale[2] = tx.scale;
      fn(x, lo, hi, scale);
    };
    for (I x = 0; x < xb; ++x) border(x);
    if (xb < xe) {
      // Scalars, so that the compiler sees loop-invariant offsets (and vectorises over x); the outputs never alias
      // the inputs.
      const AxisTap<acc_t, I> tx = tap(2, xb);
      const I lz = tz.lo, ly = ty.lo, lx = tx.lo, hz = tz.hi, hy = ty.hi, hx = tx.hi;
      const acc_t sz = tz.scale, sy = ty.scale, sx = tx.scale;
#pragma GCC ivdep
      for (I x = xb; x < xe; ++x) {
        const I lo_i[3] = {lz, ly, lx}, hi_i[3] = {hz, hy, hx};
        const acc_t scale_i[3] = {sz, sy, sx};
        fn(x, lo_i, hi_i, scale_i);
      }
    }
    for (I x = std::max(xb, xe); x < W; ++x) border(x);
  }

  void forward(const Volume<T, I>& out) const {
    TORCH_INTERNAL_ASSERT(W < 2 || out.stride[4] == 1);
    I xb, xe;
    interior_range(W, [&](I x) { return fd_is_interior(x, W, params.scheme[2]); }, xb, xe);
    const int64_t rows = int64_t(ddf.size[0]) * D * H;
    const int64_t grain = std::max<int64_t>(1, kVoxelGrain / std::max<int64_t>(1, W));
    const I cs = ddf.stride[1];
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const I n = static_cast<I>(row / (int64_t(D) * H)), z = static_cast<I>((row / H) % D),
                y = static_cast<I>(row % H);
        const T* u = &ddf.at(n, 0, z, y, 0);
        T* o = &out.at(n, 0, z, y, 0);
        for_each_x(tap(0, z), tap(1, y), xb, xe, [&](I x, const I* lo, const I* hi, const acc_t* scale) {
          o[x] = from_acc<T>(jacobian_det_from_samples(u + x, cs, lo, hi, scale));
        });
      }
    });
  }

  void backward(const Volume<const T, I>& grad_out, const Volume<T, I>& grad_ddf) const {
    // grad_out: unit stride along x, or 0 (an expanded gradient, e.g. of a sum)
    if (W > 1 && grad_out.stride[4] == 0) {
      backward_impl<true>(grad_out, grad_ddf);
    } else {
      TORCH_INTERNAL_ASSERT(W < 2 || grad_out.stride[4] == 1);
      backward_impl<false>(grad_out, grad_ddf);
    }
  }

  template <bool kBroadcastX>
  void backward_impl(const Volume<const T, I>& grad_out, const Volume<T, I>& grad_ddf) const {
    TORCH_INTERNAL_ASSERT(W < 2 || grad_ddf.stride[4] == 1);
    I xb, xe, gb, ge;
    interior_range(W, [&](I x) { return fd_is_interior(x, W, params.scheme[2]); }, xb, xe);
    interior_range(W, [&](I x) { return fd_adjoint_is_interior(x, W, params.scheme[2]); }, gb, ge);
    int dlo[3], dhi[3];
    for (int j = 0; j < 3; ++j) fd_interior_offsets(params.scheme[j], dlo[j], dhi[j]);
    const I cs = ddf.stride[1];
    const int64_t plane = int64_t(H) * W;  // the ring's channel stride
    const int64_t planes = int64_t(ddf.size[0]) * D;
    at::parallel_for(0, planes, kPlaneGrain, [&](int64_t begin, int64_t end) {
      std::unique_ptr<acc_t[]> ring(new acc_t[3 * 9 * plane]);
      const auto slot = [&](I z) { return ring.get() + (z % 3) * 9 * plane; };

      // Pass 1 for plane z of batch n.
      const auto coefficients = [&](I n, I z) {
        const AxisTap<acc_t, I> tz = tap(0, z);
        for (I y = 0; y < H; ++y) {
          const T* u = &ddf.at(n, 0, z, y, 0);
          const T* g = &grad_out.at(n, 0, z, y, 0);
          acc_t* c = slot(z) + int64_t(y) * W;
          for_each_x(tz, tap(1, y), xb, xe, [&](I x, const I* lo, const I* hi, const acc_t* scale) {
            const acc_t gx = to_acc<acc_t>(g[kBroadcastX ? 0 : x]);
            jacobian_det_coefficients(u + x, cs, lo, hi, scale, gx, c + x, plane);
          });
        }
      };

      // Pass 2 for plane z of batch n (the ring holds planes z - 1, z, z + 1 where they exist).
      const auto gather = [&](I n, I z) {
        int w[3][3];
        fd_adjoint_weights(z, D, params.scheme[0], w[0]);
        const bool z_interior = fd_adjoint_is_interior(z, D, params.scheme[0]);
        const acc_t* here_plane = slot(z);
        for (I y = 0; y < H; ++y) {
          fd_adjoint_weights(y, H, params.scheme[1], w[1]);
          const bool interior = z_interior && fd_adjoint_is_interior(y, H, params.scheme[1]);
          const acc_t* here = here_plane + int64_t(y) * W;
          const int64_t gcs = grad_ddf.stride[1];
          T* out = &grad_ddf.at(n, 0, z, y, 0);
          const auto border = [&](I x) {
            fd_adjoint_weights(x, W, params.scheme[2], w[2]);
            const acc_t* nb[3][3];
            for (int o = 0; o < 3; ++o) {
              nb[0][o] = w[0][o] != 0 ? slot(z + o - 1) + int64_t(y) * W + x : nullptr;
              nb[1][o] = w[1][o] != 0 ? here + int64_t(o - 1) * W + x : nullptr;
              nb[2][o] = w[2][o] != 0 ? here + x + (o - 1) : nullptr;
            }
            acc_t grad[3];
            jacobian_det_gather(nb, plane, w, grad);
            for (int i = 0; i < 3; ++i) out[i * gcs + x] = from_acc<T>(grad[i]);
          };
          if (!interior || gb >= ge) {
            for (I x = 0; x < W; ++x) border(x);
            continue;
          }
          for (I x = 0; x < gb; ++x) border(x);
          const acc_t *const hz = slot(z - dhi[0]) + int64_t(y) * W, *const hy = here - int64_t(dhi[1]) * W,
                             *const hx = here - dhi[2];
          const acc_t *const lz = slot(z - dlo[0]) + int64_t(y) * W, *const ly = here - int64_t(dlo[1]) * W,
                             *const lx = here - dlo[2];
#pragma GCC ivdep
          for (I x = gb; x < ge; ++x) {
            const acc_t* const hi_nb[3] = {hz + x, hy + x, hx + x};
            const acc_t* const lo_nb[3] = {lz + x, ly + x, lx + x};
            acc_t grad[3];
            jacobian_det_gather_interior(hi_nb, lo_nb, plane, grad);
            for (int i = 0; i < 3; ++i) out[i * gcs + x] = from_acc<T>(grad[i]);
          }
          for (I x = ge; x < W; ++x) border(x);
        }
      };

      for (int64_t p = begin; p < end;) {
        const I n = static_cast<I>(p / D), z0 = static_cast<I>(p % D);
        const I z1 = static_cast<I>(std::min<int64_t>(D, z0 + (end - p)));
        if (z0 > 0) coefficients(n, z0 - 1);
        coefficients(n, z0);
        for (I z = z0; z < z1; ++z) {
          if (z + 1 < D) coefficients(n, z + 1);
          gather(n, z);
        }
        p += z1 - z0;
      }
    });
  }
};

template <typename T, typename I>
void run_typed(const JacobianArgs& a) {
  const JacobianCpu<T, I> op(a);
  if (!a.backward) {
    op.forward(make_volume<T, I>(a.sample.output));  // [N, 1, D, H, W]
  } else {
    op.backward(make_volume<const T, I>(a.sample.output),  // grad_out [N, 1, D, H, W]
                make_volume<T, I>(a.sample.grad_coords));  // grad_ddf [N, 3, D, H, W]
  }
}

struct CpuJacobianRunner {
  static void run_jacobian(const JacobianArgs& a, c10::Device /*device*/) {
    dispatch_index(a.sample.index64, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      if (a.sample.coords.dtype == DType::Float64) {
        run_typed<double, I>(a);
      } else {
        run_typed<float, I>(a);
      }
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_JACOBIAN_OPS(CPU, CpuJacobianRunner)

}  // namespace deepatlas
