// Plain description of one sampler call, shared by the torch glue (g++) and the CUDA kernels (nvcc) so that the
// .cu files never include a torch header. Sizes and strides are in elements.
#pragma once

#include <cstdint>

namespace deepatlas {

enum class DType : int {
  Float16 = 0,
  BFloat16 = 1,
  Float32 = 2,
  Float64 = 3,
  UInt8 = 4,  // UInt8 .. Int64: integer label maps
  Int16 = 5,
  Int32 = 6,
  Int64 = 7,
};
enum class Interp : int { Bilinear = 0, Nearest = 1 };
enum class Padding : int { Zeros = 0, Border = 1, Reflection = 2 };

// Where the sampling coordinates come from.
//   Grid:         grid [N, D', H', W', 3], last axis (x, y, z) = (W, H, D), normalised to [-1, 1] (grid_sample).
//   Displacement: ddf  [N, 3, D, H, W], channel i along spatial axis i (D, H, W), in voxels: out[p] = in[p + u(p)].
enum class CoordKind : int { Grid = 0, Displacement = 1 };

struct TensorArg {
  void* data = nullptr;  // null: not requested (backward outputs only)
  DType dtype = DType::Float32;
  int64_t size[5] = {0, 0, 0, 0, 0};
  int64_t stride[5] = {0, 0, 0, 0, 0};
};

struct SampleArgs {
  TensorArg input;        // [N or 1, C, D, H, W]
  TensorArg coords;       // grid or ddf, see CoordKind
  TensorArg output;       // forward: the result [N, C, D', H', W']; backward: grad_output, same shape
  TensorArg grad_input;   // backward: accumulation buffer shaped like input (float32 for half/bfloat16 input)
  TensorArg grad_coords;  // backward: shaped like coords, contiguous, every element written
  CoordKind kind = CoordKind::Grid;
  Interp interp = Interp::Bilinear;
  Padding padding = Padding::Zeros;
  bool align_corners = false;
  bool index64 = false;   // true when some offset does not fit in int32
  int64_t batch = 0;      // N of coords and output
  int64_t out_size[3] = {0, 0, 0};  // D', H', W'

  int64_t num_points() const { return batch * out_size[0] * out_size[1] * out_size[2]; }
};

// The label warps (deepatlas/labels.h) reuse SampleArgs: input = integer labels [N_in, 1, D, H, W], coords = ddf,
// output = the result (nearest: labels' dtype; soft: [N, K, D, H, W] in the ddf's dtype) or, for SoftBackward,
// grad_output; grad_coords = grad_ddf.
// Finite-difference schemes of the Jacobian (deepatlas/jacobian.h).
enum class FDScheme : int { Central = 0, Forward = 1, Backward = 2 };

// jacobian_det: coords = ddf [N, 3, D, H, W]; output = det [N, 1, D, H, W] or, backward, grad_output;
// grad_coords = grad_ddf.
struct JacobianArgs {
  SampleArgs sample;
  double spacing[3] = {1, 1, 1};
  FDScheme scheme[3] = {FDScheme::Central, FDScheme::Central, FDScheme::Central};
  bool backward = false;
  TensorArg coefficients;  // CUDA backward: the [N, 9, D, H, W] gradient-coefficient buffer (acc type)
};

// warped_dice: sample.input = the source: labels [N_in, 1, D, H, W] (source_is_labels) or probabilities
// [N_in, K, D, H, W] in the ddf's dtype; sample.coords = ddf; target = labels [N, 1, ...] (the source's dtype for a
// label source, any label dtype for a probability source) or probabilities [N, K, ...] (the ddf's dtype). Forward
// writes sums [N, 3, K] (float64; rows I, A, B); backward reads grad_sums [N, 3, K] and writes sample.grad_coords
// (grad_ddf), grad_target and / or grad_source (zero-initialised, shaped like the source), each when its data
// pointer is set.
struct DiceArgs {
  SampleArgs sample;
  TensorArg target;
  bool source_is_labels = true;
  bool target_is_labels = true;
  int64_t classes = 0;
  double* sums = nullptr;
  const double* grad_sums = nullptr;
  TensorArg grad_target;
  TensorArg grad_source;
};

enum class LabelOp : int { Nearest = 0, Soft = 1, SoftBackward = 2 };

struct LabelArgs {
  SampleArgs sample;
  LabelOp op = LabelOp::Nearest;
  int64_t fill = 0;  // nearest: the label written outside the volume
};

}  // namespace deepatlas
