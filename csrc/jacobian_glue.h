// Torch-side glue for jacobian_det, shared by the CPU and CUDA backends. `Runner::run_jacobian(args, device)` does
// the per-voxel work. The CPU loops step along x with unit stride in the ddf and unit or zero stride in grad_output
// (the expanded gradient of a sum or mean): other layouts are copied to contiguous ones here. On CUDA, the
// backward's gradient coefficients (jacobian.h, pass 1) go to a [N, 9, D, H, W] buffer in the accumulation type,
// JacobianArgs::coefficients; the CPU keeps a ring of 3 z-planes per thread instead (jacobian_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include "sample_glue.h"

namespace deepatlas {

// t itself when its last axis has one of the strides in `strides` (or length <= 1), else a contiguous copy.
inline at::Tensor with_x_stride(const at::Tensor& t, std::initializer_list<int64_t> strides) {
  if (t.dim() != 5 || t.size(4) <= 1) return t;
  for (const int64_t s : strides) {
    if (t.stride(4) == s) return t;
  }
  return t.contiguous();
}

inline JacobianArgs make_jacobian_args(const at::Tensor& ddf, at::ArrayRef<double> spacing,
                                       at::ArrayRef<int64_t> schemes) {
  constexpr const char* op = "deepatlas.jacobian_det";
  TORCH_CHECK(ddf.dim() == 5 && ddf.size(1) == 3, op, ": ddf must be [N, 3, D, H, W], got ", ddf.sizes());
  TORCH_CHECK(ddf.scalar_type() == at::kFloat || ddf.scalar_type() == at::kDouble, op,
              ": ddf must be float32 or float64, got ", ddf.scalar_type());
  TORCH_CHECK(spacing.size() == 3 && schemes.size() == 3, op, ": spacing and schemes need 3 entries");
  JacobianArgs a;
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(spacing[k] > 0, op, ": spacing must be positive, got ", spacing);
    TORCH_CHECK(schemes[k] >= 0 && schemes[k] <= 2, op, ": scheme codes must be 0, 1 or 2, got ", schemes);
    a.spacing[k] = spacing[k];
    a.scheme[k] = static_cast<FDScheme>(schemes[k]);
    a.sample.out_size[k] = ddf.size(2 + k);
  }
  a.sample.batch = ddf.size(0);
  a.sample.coords = to_arg(ddf);
  return a;
}

template <typename Runner>
struct JacobianOps {
  static at::Tensor det(const at::Tensor& ddf_in, at::ArrayRef<double> spacing, at::ArrayRef<int64_t> schemes) {
    const at::Tensor ddf = with_x_stride(ddf_in, {1});
    JacobianArgs a = make_jacobian_args(ddf, spacing, schemes);
    at::Tensor out = at::empty({ddf.size(0), 1, ddf.size(2), ddf.size(3), ddf.size(4)}, ddf.options());
    a.sample.output = to_arg(out);
    a.sample.index64 = needs_index64({ddf, out});
    if (out.numel() > 0) Runner::run_jacobian(a, ddf.device());
    return out;
  }

  static at::Tensor det_backward(const at::Tensor& grad_output, const at::Tensor& ddf_in,
                                 at::ArrayRef<double> spacing, at::ArrayRef<int64_t> schemes) {
    const at::Tensor ddf = with_x_stride(ddf_in, {1});
    JacobianArgs a = make_jacobian_args(ddf, spacing, schemes);
    const std::array<int64_t, 5> expected = {ddf.size(0), 1, ddf.size(2), ddf.size(3), ddf.size(4)};
    TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "deepatlas.jacobian_det: grad_output must be ",
                at::IntArrayRef(expected), ", got ", grad_output.sizes());
    TORCH_CHECK(grad_output.device() == ddf.device(), "deepatlas.jacobian_det: grad_output is on ",
                grad_output.device(), ", expected ", ddf.device());
    const at::Tensor gout = with_x_stride(grad_output.to(ddf.scalar_type()), {0, 1});
    at::Tensor grad_ddf = at::empty(ddf.sizes(), ddf.options().memory_format(at::MemoryFormat::Contiguous));
    a.backward = true;
    a.sample.output = to_arg(gout);
    a.sample.grad_coords = to_arg(grad_ddf);
    at::Tensor coefficients;  // CUDA only: [N, 9, D, H, W], float for float, double for double
    if (ddf.is_cuda() && grad_ddf.numel() > 0) {
      coefficients = at::empty({ddf.size(0), 9, ddf.size(2), ddf.size(3), ddf.size(4)}, ddf.options());
      a.coefficients = to_arg(coefficients);
    }
    a.sample.index64 = coefficients.defined() ? needs_index64({ddf, gout, grad_ddf, coefficients})
                                              : needs_index64({ddf, gout, grad_ddf});
    if (grad_ddf.numel() > 0) Runner::run_jacobian(a, ddf.device());
    return grad_ddf;
  }
};

#define DEEPATLAS_REGISTER_JACOBIAN_OPS(KEY, RUNNER)                                   \
  TORCH_LIBRARY_IMPL(deepatlas, KEY, m) {                                              \
    m.impl("jacobian_det", &::deepatlas::JacobianOps<RUNNER>::det);                    \
    m.impl("jacobian_det_backward", &::deepatlas::JacobianOps<RUNNER>::det_backward);  \
  }

}  // namespace deepatlas
