// CPU backend of jacobian_det: at::parallel_for over voxels -> deepatlas/jacobian.h.
#include <torch/library.h>

#include "cpu/parallel.h"
#include "deepatlas/jacobian.h"
#include "deepatlas/sample_dispatch.h"
#include "jacobian_glue.h"

namespace deepatlas {
namespace {

template <typename T, typename I>
void run_typed(const JacobianArgs& a) {
  using acc_t = typename AccType<T>::type;
  JacobianParams<acc_t> params;
  for (int k = 0; k < 3; ++k) {
    params.inv_spacing[k] = static_cast<acc_t>(1.0 / a.spacing[k]);
    params.scheme[k] = a.scheme[k];
  }
  const auto ddf = make_volume<const T, I>(a.sample.coords);  // [N, 3, D, H, W]
  if (!a.backward) {
    const auto out = make_volume<T, I>(a.sample.output);  // [N, 1, D, H, W]
    parallel_over_points<I>(a.sample, [&](const Point<I>& q) { jacobian_det_point(ddf, out, q, params); });
  } else {
    const auto grad_out = make_volume<const T, I>(a.sample.output);  // [N, 1, D, H, W]
    const auto grad_ddf = make_volume<T, I>(a.sample.grad_coords);   // [N, 3, D, H, W]
    parallel_over_points<I>(a.sample, [&](const Point<I>& q) {
      jacobian_det_backward_point(ddf, grad_out, grad_ddf, q, params);
    });
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
