// Torch-side glue for the label warps, shared by the CPU and CUDA backends: checks (a safety net behind the Python
// layer's readable errors; the label-range check lives here so that it also guards direct torch.ops calls),
// output allocation, LabelArgs construction. `Runner::run_labels(args, device)` does the per-point work.
#pragma once

#include <ATen/ATen.h>

#include "sample_glue.h"

namespace deepatlas {

inline bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

inline void check_label_inputs(const char* op, const at::Tensor& labels, const at::Tensor& ddf) {
  TORCH_CHECK(labels.dim() == 5 && labels.size(1) == 1, op, ": labels must be [N, 1, D, H, W], got ",
              labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), op, ": labels must be uint8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(ddf.dim() == 5 && ddf.size(1) == 3, op, ": ddf must be [N, 3, D, H, W], got ", ddf.sizes());
  TORCH_CHECK(ddf.scalar_type() == at::kFloat || ddf.scalar_type() == at::kDouble, op,
              ": ddf must be float32 or float64, got ", ddf.scalar_type());
  TORCH_CHECK(labels.device() == ddf.device(), op, ": labels and ddf must be on the same device, got ",
              labels.device(), " and ", ddf.device());
  TORCH_CHECK(labels.size(0) == ddf.size(0) || labels.size(0) == 1, op, ": labels batch ", labels.size(0),
              " must equal the ddf batch ", ddf.size(0), " or be 1");
  for (int k = 2; k < 5; ++k) {
    TORCH_CHECK(labels.size(k) == ddf.size(k), op, ": labels spatial shape ", labels.sizes().slice(2),
                " must equal the ddf spatial shape ", ddf.sizes().slice(2));
    TORCH_CHECK(labels.size(k) > 0, op, ": labels must have non-empty spatial dimensions, got ", labels.sizes());
  }
}

inline void check_label_range(const char* op, const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(num_classes > 0, op, ": num_classes must be positive, got ", num_classes);
  if (labels.numel() == 0) return;
  const auto [low, high] = at::aminmax(labels);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_classes, op, ": label values must be in [0, num_classes) = [0, ", num_classes,
              "), found values in [", lo, ", ", hi, "]");
}

inline LabelArgs make_label_args(const at::Tensor& labels, const at::Tensor& ddf, LabelOp op) {
  LabelArgs a;
  a.op = op;
  a.sample.kind = CoordKind::Displacement;
  a.sample.interp = op == LabelOp::Nearest ? Interp::Nearest : Interp::Bilinear;
  a.sample.padding = Padding::Zeros;
  a.sample.align_corners = true;
  a.sample.batch = ddf.size(0);
  for (int k = 0; k < 3; ++k) a.sample.out_size[k] = ddf.size(2 + k);
  a.sample.input = to_arg(labels);
  a.sample.coords = to_arg(ddf);
  return a;
}

template <typename Runner>
struct LabelOps {
  static at::Tensor nearest(const at::Tensor& labels, const at::Tensor& ddf, int64_t fill) {
    check_label_inputs("deepatlas.warp_labels", labels, ddf);
    at::Tensor out = at::empty({ddf.size(0), 1, ddf.size(2), ddf.size(3), ddf.size(4)}, labels.options());
    LabelArgs a = make_label_args(labels, ddf, LabelOp::Nearest);
    a.fill = fill;
    a.sample.output = to_arg(out);
    a.sample.index64 = needs_index64({labels, ddf, out});
    if (out.numel() > 0) Runner::run_labels(a, ddf.device());
    return out;
  }

  static at::Tensor soft(const at::Tensor& labels, const at::Tensor& ddf, int64_t num_classes) {
    check_label_inputs("deepatlas.warp_labels", labels, ddf);
    check_label_range("deepatlas.warp_labels", labels, num_classes);
    at::Tensor out = at::empty({ddf.size(0), num_classes, ddf.size(2), ddf.size(3), ddf.size(4)}, ddf.options());
    LabelArgs a = make_label_args(labels, ddf, LabelOp::Soft);
    a.sample.output = to_arg(out);
    a.sample.index64 = needs_index64({labels, ddf, out});
    if (out.numel() > 0) Runner::run_labels(a, ddf.device());
    return out;
  }

  static at::Tensor soft_backward(const at::Tensor& grad_output, const at::Tensor& labels, const at::Tensor& ddf,
                                  int64_t num_classes) {
    check_label_inputs("deepatlas.warp_labels", labels, ddf);
    const std::array<int64_t, 5> expected = {ddf.size(0), num_classes, ddf.size(2), ddf.size(3), ddf.size(4)};
    TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "deepatlas.warp_labels: grad_output must be ",
                at::IntArrayRef(expected), ", got ", grad_output.sizes());
    TORCH_CHECK(grad_output.device() == ddf.device(), "deepatlas.warp_labels: grad_output is on ",
                grad_output.device(), ", expected ", ddf.device());
    const at::Tensor gout = grad_output.to(ddf.scalar_type());
    at::Tensor grad_ddf = at::empty(ddf.sizes(), ddf.options().memory_format(at::MemoryFormat::Contiguous));
    LabelArgs a = make_label_args(labels, ddf, LabelOp::SoftBackward);
    a.sample.output = to_arg(gout);
    a.sample.grad_coords = to_arg(grad_ddf);
    a.sample.index64 = needs_index64({labels, ddf, gout, grad_ddf});
    if (grad_ddf.numel() > 0) Runner::run_labels(a, ddf.device());
    return grad_ddf;
  }
};

#define DEEPATLAS_REGISTER_LABEL_OPS(KEY, RUNNER)                                              \
  TORCH_LIBRARY_IMPL(deepatlas, KEY, m) {                                                      \
    m.impl("warp_labels_nearest", &::deepatlas::LabelOps<RUNNER>::nearest);                    \
    m.impl("warp_labels_soft", &::deepatlas::LabelOps<RUNNER>::soft);                          \
    m.impl("warp_labels_soft_backward", &::deepatlas::LabelOps<RUNNER>::soft_backward);        \
  }

}  // namespace deepatlas
