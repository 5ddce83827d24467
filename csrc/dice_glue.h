// Torch-side glue for the fused warped Dice sums, shared by the CPU and CUDA backends.
// `Runner::run_dice(args, device)` does the per-point work.
#pragma once

#include <limits>

#include <ATen/ATen.h>

#include "labels_glue.h"

namespace deepatlas {

// A probability source: [N or 1, num_classes, D, H, W] in the ddf's dtype, on its device, spatially the ddf's shape.
inline void check_probability_source(const char* op, const at::Tensor& source, const at::Tensor& ddf,
                                     int64_t num_classes) {
  TORCH_CHECK(ddf.dim() == 5 && ddf.size(1) == 3, op, ": ddf must be [N, 3, D, H, W], got ", ddf.sizes());
  TORCH_CHECK(ddf.scalar_type() == at::kFloat || ddf.scalar_type() == at::kDouble, op,
              ": ddf must be float32 or float64, got ", ddf.scalar_type());
  TORCH_CHECK(source.dim() == 5 && source.size(1) == num_classes, op,
              ": a probability source must be [N or 1, num_classes=", num_classes, ", D, H, W], got ",
              source.sizes());
  TORCH_CHECK(source.scalar_type() == ddf.scalar_type(), op, ": a probability source must have the ddf's dtype ",
              ddf.scalar_type(), ", got ", source.scalar_type());
  TORCH_CHECK(source.device() == ddf.device(), op, ": source must be on ", ddf.device(), ", got ", source.device());
  TORCH_CHECK(source.size(0) == ddf.size(0) || source.size(0) == 1, op, ": source batch ", source.size(0),
              " must equal the ddf batch ", ddf.size(0), " or be 1");
  for (int k = 2; k < 5; ++k) {
    TORCH_CHECK(source.size(k) == ddf.size(k), op, ": source spatial shape ", source.sizes().slice(2),
                " must equal the ddf spatial shape ", ddf.sizes().slice(2));
    TORCH_CHECK(source.size(k) > 0, op, ": source must have non-empty spatial dimensions, got ", source.sizes());
  }
}

// check_ranges scans the label maps (and syncs on CUDA): done in the forward only; the kernels skip out-of-range
// labels in any case, so a direct backward call cannot read or write out of bounds.
inline DiceArgs make_dice_args(const at::Tensor& source, const at::Tensor& ddf, const at::Tensor& target,
                               int64_t num_classes, bool check_ranges) {
  constexpr const char* op = "deepatlas.warped_dice";
  TORCH_CHECK(num_classes > 0, op, ": num_classes must be positive, got ", num_classes);
  // The kernels index classes in the 32-bit index type when every tensor fits it.
  TORCH_CHECK(num_classes <= std::numeric_limits<int32_t>::max(), op, ": num_classes must be below 2^31, got ",
              num_classes);
  DiceArgs a;
  a.source_is_labels = is_label_dtype(source.scalar_type());
  if (a.source_is_labels) {
    check_label_inputs(op, source, ddf);
    if (check_ranges) check_label_range("deepatlas.warped_dice: source", source, num_classes);
  } else {
    check_probability_source(op, source, ddf, num_classes);
  }
  TORCH_CHECK(target.dim() == 5 && target.size(0) == ddf.size(0), op,
              ": target must be [N, 1 or K, D, H, W] with N = ", ddf.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.device() == ddf.device(), op, ": target must be on ", ddf.device(), ", got ", target.device());
  for (int k = 2; k < 5; ++k) {
    TORCH_CHECK(target.size(k) == ddf.size(k), op, ": target spatial shape ", target.sizes().slice(2),
                " must equal the ddf spatial shape ", ddf.sizes().slice(2));
  }
  a.target_is_labels = is_label_dtype(target.scalar_type());
  if (a.target_is_labels) {
    if (a.source_is_labels) {
      TORCH_CHECK(target.size(1) == 1 && target.scalar_type() == source.scalar_type(), op,
                  ": label targets must be [N, 1, D, H, W] with the source's dtype ", source.scalar_type(), ", got ",
                  target.sizes(), " ", target.scalar_type());
    } else {
      TORCH_CHECK(target.size(1) == 1, op, ": label targets must be [N, 1, D, H, W], got ", target.sizes());
    }
    if (check_ranges) check_label_range("deepatlas.warped_dice: target", target, num_classes);
  } else {
    TORCH_CHECK(target.size(1) == num_classes && target.scalar_type() == ddf.scalar_type(), op,
                ": probability targets must be [N, num_classes=", num_classes, ", D, H, W] with the ddf's dtype ",
                ddf.scalar_type(), ", got ", target.sizes(), " ", target.scalar_type());
  }
  a.sample = make_label_args(source, ddf, LabelOp::Soft).sample;
  a.target = to_arg(target);
  a.classes = num_classes;
  return a;
}

template <typename Runner>
struct DiceOps {
  static at::Tensor sums(const at::Tensor& source, const at::Tensor& ddf, const at::Tensor& target,
                         int64_t num_classes) {
    DiceArgs a = make_dice_args(source, ddf, target, num_classes, /*check_ranges=*/true);
    at::Tensor out = at::zeros({ddf.size(0), 3, num_classes}, ddf.options().dtype(at::kDouble));
    a.sums = out.data_ptr<double>();
    a.sample.index64 = needs_index64({source, ddf, target});
    if (a.sample.num_points() > 0) Runner::run_dice(a, ddf.device());
    return out;
  }

  // output_mask: (ddf, target, source); each gradient is an empty tensor when not requested.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> sums_backward(const at::Tensor& grad_sums,
                                                                      const at::Tensor& source, const at::Tensor& ddf,
                                                                      const at::Tensor& target, int64_t num_classes,
                                                                      std::array<bool, 3> output_mask) {
    DiceArgs a = make_dice_args(source, ddf, target, num_classes, /*check_ranges=*/false);
    TORCH_CHECK(grad_sums.sizes() == at::IntArrayRef({ddf.size(0), 3, num_classes}),
                "deepatlas.warped_dice: grad_sums must be [N, 3, K], got ", grad_sums.sizes());
    const at::Tensor g = grad_sums.to(ddf.device(), at::kDouble).contiguous();
    a.grad_sums = g.data_ptr<double>();
    at::Tensor grad_ddf = at::empty({0}, ddf.options());
    at::Tensor grad_target = at::empty({0}, ddf.options());
    at::Tensor grad_source = at::empty({0}, ddf.options());
    if (output_mask[0]) {
      grad_ddf = at::empty(ddf.sizes(), ddf.options().memory_format(at::MemoryFormat::Contiguous));
      a.sample.grad_coords = to_arg(grad_ddf);
    }
    if (output_mask[1]) {
      TORCH_CHECK(!a.target_is_labels, "deepatlas.warped_dice: integer label targets have no gradient");
      grad_target = at::empty(target.sizes(), target.options().memory_format(at::MemoryFormat::Contiguous));
      a.grad_target = to_arg(grad_target);
    }
    if (output_mask[2]) {
      TORCH_CHECK(!a.source_is_labels, "deepatlas.warped_dice: integer label sources have no gradient");
      grad_source = at::zeros(source.sizes(), source.options().memory_format(at::MemoryFormat::Contiguous));
      a.grad_source = to_arg(grad_source);
    }
    a.sample.index64 = needs_index64({source, ddf, target, grad_ddf, grad_target, grad_source});
    const bool any = output_mask[0] || output_mask[1] || output_mask[2];
    if (any && a.sample.num_points() > 0) Runner::run_dice(a, ddf.device());
    return {grad_ddf, grad_target, grad_source};
  }
};

#define DEEPATLAS_REGISTER_DICE_OPS(KEY, RUNNER)                                               \
  TORCH_LIBRARY_IMPL(deepatlas, KEY, m) {                                                      \
    m.impl("warped_dice_sums", &::deepatlas::DiceOps<RUNNER>::sums);                           \
    m.impl("warped_dice_sums_backward", &::deepatlas::DiceOps<RUNNER>::sums_backward);         \
  }

}  // namespace deepatlas
