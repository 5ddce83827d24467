// Torch-side glue for the fused warped Dice sums, shared by the CPU and CUDA backends.
// `Runner::run_dice(args, device)` does the per-point work.
#pragma once

#include <ATen/ATen.h>

#include "labels_glue.h"

namespace deepatlas {

// check_ranges scans both label maps (and syncs on CUDA): done in the forward only; the kernels skip out-of-range
// labels in any case, so a direct backward call cannot read or write out of bounds.
inline DiceArgs make_dice_args(const at::Tensor& source, const at::Tensor& ddf, const at::Tensor& target,
                               int64_t num_classes, bool check_ranges) {
  constexpr const char* op = "deepatlas.warped_dice";
  check_label_inputs(op, source, ddf);
  if (check_ranges) check_label_range(op, source, num_classes);
  TORCH_CHECK(target.dim() == 5 && target.size(0) == ddf.size(0), op,
              ": target must be [N, 1 or K, D, H, W] with N = ", ddf.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.device() == ddf.device(), op, ": target must be on ", ddf.device(), ", got ", target.device());
  for (int k = 2; k < 5; ++k) {
    TORCH_CHECK(target.size(k) == ddf.size(k), op, ": target spatial shape ", target.sizes().slice(2),
                " must equal the ddf spatial shape ", ddf.sizes().slice(2));
  }
  DiceArgs a;
  a.target_is_labels = is_label_dtype(target.scalar_type());
  if (a.target_is_labels) {
    TORCH_CHECK(target.size(1) == 1 && target.scalar_type() == source.scalar_type(), op,
                ": label targets must be [N, 1, D, H, W] with the source's dtype ", source.scalar_type(), ", got ",
                target.sizes(), " ", target.scalar_type());
    if (check_ranges) check_label_range(op, target, num_classes);
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

  static std::tuple<at::Tensor, at::Tensor> sums_backward(const at::Tensor& grad_sums, const at::Tensor& source,
                                                          const at::Tensor& ddf, const at::Tensor& target,
                                                          int64_t num_classes, std::array<bool, 2> output_mask) {
    DiceArgs a = make_dice_args(source, ddf, target, num_classes, /*check_ranges=*/false);
    TORCH_CHECK(grad_sums.sizes() == at::IntArrayRef({ddf.size(0), 3, num_classes}),
                "deepatlas.warped_dice: grad_sums must be [N, 3, K], got ", grad_sums.sizes());
    const at::Tensor g = grad_sums.to(ddf.device(), at::kDouble).contiguous();
    a.grad_sums = g.data_ptr<double>();
    at::Tensor grad_ddf = at::empty({0}, ddf.options());
    at::Tensor grad_target = at::empty({0}, ddf.options());
    if (output_mask[0]) {
      grad_ddf = at::empty(ddf.sizes(), ddf.options().memory_format(at::MemoryFormat::Contiguous));
      a.sample.grad_coords = to_arg(grad_ddf);
    }
    if (output_mask[1]) {
      TORCH_CHECK(!a.target_is_labels, "deepatlas.warped_dice: integer label targets have no gradient");
      grad_target = at::empty(target.sizes(), target.options().memory_format(at::MemoryFormat::Contiguous));
      a.grad_target = to_arg(grad_target);
    }
    a.sample.index64 = needs_index64({source, ddf, target, grad_ddf, grad_target});
    if ((output_mask[0] || output_mask[1]) && a.sample.num_points() > 0) Runner::run_dice(a, ddf.device());
    return {grad_ddf, grad_target};
  }
};

#define DEEPATLAS_REGISTER_DICE_OPS(KEY, RUNNER)                                               \
  TORCH_LIBRARY_IMPL(deepatlas, KEY, m) {                                                      \
    m.impl("warped_dice_sums", &::deepatlas::DiceOps<RUNNER>::sums);                           \
    m.impl("warped_dice_sums_backward", &::deepatlas::DiceOps<RUNNER>::sums_backward);         \
  }

}  // namespace deepatlas
