// The one schema block of the deepatlas operator library. Backends (cpu/, cuda/) only add implementations;
// Python (deepatlas_cuda/ops.py) adds fake kernels and autograd.
//
// Integer codes: interpolation 0 = bilinear (trilinear in 3-D), 1 = nearest;
//                padding 0 = zeros, 1 = border, 2 = reflection.
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(deepatlas, m) {
  // input [N, C, D, H, W], grid [N, D', H', W', 3] -> [N, C, D', H', W'] (torch.nn.functional.grid_sample).
  m.def("grid_sample_3d(Tensor input, Tensor grid, int interpolation, int padding, bool align_corners) -> Tensor");
  // -> (grad_input or an empty tensor, grad_grid or an empty tensor), per output_mask.
  m.def(
      "grid_sample_3d_backward(Tensor grad_output, Tensor input, Tensor grid, int interpolation, int padding, "
      "bool align_corners, bool[2] output_mask) -> (Tensor, Tensor)");
  // image [N or 1, C, D, H, W], ddf [N, 3, D, H, W] in voxels -> [N, C, D, H, W], out[x] = image[x + ddf[x]].
  m.def("warp(Tensor image, Tensor ddf, int interpolation, int padding) -> Tensor");
  m.def(
      "warp_backward(Tensor grad_output, Tensor image, Tensor ddf, int interpolation, int padding, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // labels [N or 1, 1, D, H, W] (uint8/int16/int32/int64), ddf [N, 3, D, H, W] -> labels' dtype; `fill` outside.
  m.def("warp_labels_nearest(Tensor labels, Tensor ddf, int fill) -> Tensor");
  // -> [N, num_classes, D, H, W] in the ddf's dtype: the trilinear warp of the one-hot encoding, never built.
  m.def("warp_labels_soft(Tensor labels, Tensor ddf, int num_classes) -> Tensor");
  m.def("warp_labels_soft_backward(Tensor grad_output, Tensor labels, Tensor ddf, int num_classes) -> Tensor");
  // ddf [N, 3, D, H, W] -> det(I + grad u) [N, 1, D, H, W]; schemes per axis: 0 central, 1 forward, 2 backward.
  m.def("jacobian_det(Tensor ddf, float[3] spacing, int[3] schemes) -> Tensor");
  m.def("jacobian_det_backward(Tensor grad_output, Tensor ddf, float[3] spacing, int[3] schemes) -> Tensor");
  // Fused soft-Dice sums of warp(source) vs target: source = integer labels [N or 1, 1, ...] (warped one-hot) or
  // probabilities [N or 1, K, ...]; target = labels or [N, K, ...] probabilities.
  // -> float64 [N, 3, K], rows: intersection, warped-source sum, target sum. No K-channel volume is built.
  m.def("warped_dice_sums(Tensor source, Tensor ddf, Tensor target, int num_classes) -> Tensor");
  // -> (grad_ddf, grad_target, grad_source), each an empty tensor unless requested by output_mask (same order).
  m.def(
      "warped_dice_sums_backward(Tensor grad_sums, Tensor source, Tensor ddf, Tensor target, int num_classes, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // "avx2" or "baseline": the instruction set of the CPU's flattened loops now (cpu/isa.h); for build_info().
  m.def("cpu_loops() -> str", &deepatlas::cpu_loops);
}
