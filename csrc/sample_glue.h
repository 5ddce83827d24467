// Torch-side glue for the sampler ops, shared by the CPU and CUDA backends: argument checks (a safety net: the
// Python layer already raised a readable error), output allocation, and SampleArgs construction. The per-voxel
// work happens in a backend runner passed in as `Runner` (run_forward / run_backward / run_backward_pairs, given the
// device; kAtomicScatter says whether its run_backward scatters the input gradient with atomics).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <climits>
#include <cstdlib>
#include <tuple>

#include "deepatlas/pair_scatter.h"
#include "deepatlas/sample_args.h"

namespace deepatlas {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kByte:
      return DType::UInt8;
    case at::kShort:
      return DType::Int16;
    case at::kInt:
      return DType::Int32;
    case at::kLong:
      return DType::Int64;
    default:
      TORCH_CHECK(false, "deepatlas: unsupported dtype ", t);
  }
}

inline TensorArg to_arg(const at::Tensor& t) {
  TensorArg a;
  if (!t.defined()) return a;
  a.data = t.data_ptr();
  a.dtype = to_dtype(t.scalar_type());
  for (int k = 0; k < 5; ++k) {
    a.size[k] = t.size(k);
    a.stride[k] = t.stride(k);
  }
  return a;
}

// Largest element offset reachable in t, and the element count, must fit in int32 for the fast path.
inline bool fits_int32(const at::Tensor& t) {
  if (!t.defined()) return true;
  int64_t max_offset = 0;
  for (int64_t k = 0; k < t.dim(); ++k) max_offset += (t.size(k) - 1) * t.stride(k);
  return max_offset < INT_MAX && t.numel() < INT_MAX;
}

// DEEPATLAS_FORCE_INDEX64=1 takes the 64-bit path everywhere (to test it against the 32-bit one).
inline bool force_index64() {
  const char* v = std::getenv("DEEPATLAS_FORCE_INDEX64");
  return v != nullptr && v[0] == '1';
}

struct SampleSpec {
  CoordKind kind;
  const char* op;          // op name for messages
  const char* input_name;  // "input" or "image"
  const char* coords_name; // "grid" or "ddf"
};

inline void check_dtypes(const SampleSpec& s, const at::Tensor& input, const at::Tensor& coords) {
  const auto ti = input.scalar_type();
  const auto tc = coords.scalar_type();
  const bool cuda = input.is_cuda();
  auto reduced_or_float = [](at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; };
  const bool ok = (ti == at::kDouble && tc == at::kDouble) ||
                  (cuda ? (reduced_or_float(ti) && reduced_or_float(tc)) : (ti == at::kFloat && tc == at::kFloat));
  TORCH_CHECK(ok, s.op, ": unsupported dtypes ", s.input_name, "=", ti, ", ", s.coords_name, "=", tc,
              "; expected both float32 or both float64",
              cuda ? ", or any mix of float16/bfloat16/float32 on CUDA" : "");
}

// Validates shapes and devices; returns the output spatial size (D', H', W').
inline std::array<int64_t, 3> check_sample_inputs(const SampleSpec& s, const at::Tensor& input,
                                                  const at::Tensor& coords) {
  TORCH_CHECK(input.dim() == 5, s.op, ": ", s.input_name, " must be 5-D [N, C, D, H, W], got ", input.sizes());
  TORCH_CHECK(coords.dim() == 5, s.op, ": ", s.coords_name, " must be 5-D, got ", coords.sizes());
  TORCH_CHECK(input.device() == coords.device(), s.op, ": ", s.input_name, " and ", s.coords_name,
              " must be on the same device, got ", input.device(), " and ", coords.device());
  check_dtypes(s, input, coords);
  std::array<int64_t, 3> out_size;
  if (s.kind == CoordKind::Grid) {
    TORCH_CHECK(coords.size(4) == 3, s.op, ": grid must be [N, D', H', W', 3], got ", coords.sizes());
    TORCH_CHECK(input.size(0) == coords.size(0), s.op, ": input and grid batch sizes differ: ", input.size(0),
                " vs ", coords.size(0));
    out_size = {coords.size(1), coords.size(2), coords.size(3)};
  } else {
    TORCH_CHECK(coords.size(1) == 3, s.op, ": ddf must be [N, 3, D, H, W], got ", coords.sizes());
    TORCH_CHECK(input.size(0) == coords.size(0) || input.size(0) == 1, s.op, ": image batch ", input.size(0),
                " must equal the ddf batch ", coords.size(0), " or be 1");
    for (int k = 0; k < 3; ++k) {
      TORCH_CHECK(input.size(2 + k) == coords.size(2 + k), s.op, ": image spatial shape ",
                  input.sizes().slice(2), " must equal the ddf spatial shape ", coords.sizes().slice(2));
    }
    out_size = {coords.size(2), coords.size(3), coords.size(4)};
  }
  for (int k = 2; k < 5; ++k) {
    TORCH_CHECK(input.size(k) > 0, s.op, ": ", s.input_name, " must have non-empty spatial dimensions, got ",
                input.sizes());
  }
  return out_size;
}

inline SampleArgs make_args(const SampleSpec& s, const at::Tensor& input, const at::Tensor& coords,
                            const std::array<int64_t, 3>& out_size, int64_t interpolation, int64_t padding,
                            bool align_corners) {
  TORCH_CHECK(interpolation == 0 || interpolation == 1, s.op, ": interpolation code must be 0 or 1, got ",
              interpolation);
  TORCH_CHECK(padding >= 0 && padding <= 2, s.op, ": padding code must be 0, 1 or 2, got ", padding);
  SampleArgs a;
  a.kind = s.kind;
  a.interp = static_cast<Interp>(interpolation);
  a.padding = static_cast<Padding>(padding);
  a.align_corners = align_corners;
  a.batch = coords.size(0);
  for (int k = 0; k < 3; ++k) a.out_size[k] = out_size[k];
  a.input = to_arg(input);
  a.coords = to_arg(coords);
  return a;
}

inline bool needs_index64(std::initializer_list<at::Tensor> tensors) {
  if (force_index64()) return true;
  for (const auto& t : tensors) {
    if (!fits_int32(t)) return true;
  }
  return false;
}

template <typename Runner>
at::Tensor sample_forward(const SampleSpec& s, const at::Tensor& input, const at::Tensor& coords,
                          int64_t interpolation, int64_t padding, bool align_corners) {
  const auto out_size = check_sample_inputs(s, input, coords);
  at::Tensor out = at::empty({coords.size(0), input.size(1), out_size[0], out_size[1], out_size[2]},
                             input.options());
  SampleArgs a = make_args(s, input, coords, out_size, interpolation, padding, align_corners);
  a.output = to_arg(out);
  a.index64 = needs_index64({input, coords, out});
  if (out.numel() > 0) Runner::run_forward(a, input.device());
  return out;
}

// DEEPATLAS_FORCE_PAIR_SCATTER=1 computes the input gradient by pairs on every device (to test that path on the
// CPU against the plain scatter).
inline bool force_pair_scatter() {
  const char* v = std::getenv("DEEPATLAS_FORCE_PAIR_SCATTER");
  return v != nullptr && v[0] == '1';
}

// The pair path replaces a scatter with atomics when the user asked for deterministic algorithms.
inline bool use_pair_scatter(bool atomic_scatter) {
  return force_pair_scatter() || (atomic_scatter && at::globalContext().deterministicAlgorithms());
}

// The input gradient by pairs (deepatlas/pair_scatter.h): the runner writes (index, value) pairs for every output
// point, and index_put_(accumulate=True) sums them per index (deterministic under use_deterministic_algorithms).
// Costs P * C * 8 (bilinear) pairs of an int64 key and a float32 / float64 value. `flat`: zeros, numel + 1 elements,
// of which a.grad_input views the first numel; the last collects the unused slots.
template <typename Runner>
void pair_scatter(const SampleArgs& a, const at::Tensor& flat) {
  PairScatterArgs pairs;
  pairs.sample = a;
  pairs.slots_per_point = pair_slots_per_point(a);
  pairs.trash = flat.numel() - 1;
  const int64_t slots = a.num_points() * pairs.slots_per_point;  // slot offsets are computed in int64
  at::Tensor keys = at::empty({slots}, flat.options().dtype(at::kLong));
  at::Tensor values = at::empty({slots}, flat.options());
  pairs.keys = keys.data_ptr<int64_t>();
  pairs.values = values.data_ptr();
  Runner::run_backward_pairs(pairs, flat.device());
  flat.index_put_({keys}, values, /*accumulate=*/true);
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor> sample_backward(const SampleSpec& s, const at::Tensor& grad_output,
                                                   const at::Tensor& input, const at::Tensor& coords,
                                                   int64_t interpolation, int64_t padding, bool align_corners,
                                                   std::array<bool, 2> output_mask) {
  const auto out_size = check_sample_inputs(s, input, coords);
  const std::array<int64_t, 5> expected = {coords.size(0), input.size(1), out_size[0], out_size[1], out_size[2]};
  TORCH_CHECK(grad_output.dim() == 5 && grad_output.sizes() == at::IntArrayRef(expected), s.op,
              ": grad_output must have the output's shape ", at::IntArrayRef(expected), ", got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), s.op, ": grad_output is on ", grad_output.device(),
              ", expected ", input.device());
  const at::Tensor gout = grad_output.scalar_type() == input.scalar_type() ? grad_output
                                                                            : grad_output.to(input.scalar_type());
  SampleArgs a = make_args(s, input, coords, out_size, interpolation, padding, align_corners);
  a.output = to_arg(gout);

  // No points or no channels: nothing flows back (and an empty grad_output may have no storage to index).
  const bool work = a.num_points() > 0 && input.size(1) > 0;
  const bool pairs = output_mask[0] && work && use_pair_scatter(Runner::kAtomicScatter);
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  const auto acc_options = input.options().dtype(reduced ? at::kFloat : input.scalar_type());
  at::Tensor grad_input_acc;
  at::Tensor pair_buffer;  // the pair path's accumulation buffer: grad_input_acc plus one unused-slot element
  at::Tensor grad_coords;
  if (pairs) {
    pair_buffer = at::zeros({input.numel() + 1}, acc_options);
    grad_input_acc = pair_buffer.narrow(0, 0, input.numel()).view(input.sizes());
  } else if (output_mask[0]) {
    grad_input_acc = at::zeros(input.sizes(), acc_options);
  }
  if (output_mask[0]) a.grad_input = to_arg(grad_input_acc);
  if (output_mask[1]) {
    grad_coords = at::empty(coords.sizes(), coords.options().memory_format(at::MemoryFormat::Contiguous));
    a.grad_coords = to_arg(grad_coords);
  }
  a.index64 = needs_index64({input, coords, gout, grad_input_acc, grad_coords});
  if (pairs) {
    SampleArgs coords_only = a;
    coords_only.grad_input = TensorArg{};
    if (output_mask[1]) Runner::run_backward(coords_only, input.device());
    pair_scatter<Runner>(a, pair_buffer);
  } else if ((output_mask[0] || output_mask[1]) && work) {
    Runner::run_backward(a, input.device());
  }
  if (output_mask[1] && !work) grad_coords.zero_();

  at::Tensor grad_input = output_mask[0] ? grad_input_acc.to(input.scalar_type()) : at::empty({0}, input.options());
  if (!output_mask[1]) grad_coords = at::empty({0}, coords.options());
  return {grad_input, grad_coords};
}

constexpr SampleSpec kGridSampleSpec{CoordKind::Grid, "deepatlas.grid_sample", "input", "grid"};
constexpr SampleSpec kWarpSpec{CoordKind::Displacement, "deepatlas.warp", "image", "ddf"};

// The four op implementations for one backend.
template <typename Runner>
struct SampleOps {
  static at::Tensor grid_sample(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                int64_t padding, bool align_corners) {
    return sample_forward<Runner>(kGridSampleSpec, input, grid, interpolation, padding, align_corners);
  }
  static std::tuple<at::Tensor, at::Tensor> grid_sample_backward(const at::Tensor& grad_output,
                                                                 const at::Tensor& input, const at::Tensor& grid,
                                                                 int64_t interpolation, int64_t padding,
                                                                 bool align_corners, std::array<bool, 2> mask) {
    return sample_backward<Runner>(kGridSampleSpec, grad_output, input, grid, interpolation, padding,
                                   align_corners, mask);
  }
  static at::Tensor warp(const at::Tensor& image, const at::Tensor& ddf, int64_t interpolation, int64_t padding) {
    return sample_forward<Runner>(kWarpSpec, image, ddf, interpolation, padding, true);
  }
  static std::tuple<at::Tensor, at::Tensor> warp_backward(const at::Tensor& grad_output, const at::Tensor& image,
                                                          const at::Tensor& ddf, int64_t interpolation,
                                                          int64_t padding, std::array<bool, 2> mask) {
    return sample_backward<Runner>(kWarpSpec, grad_output, image, ddf, interpolation, padding, true, mask);
  }
};

#define DEEPATLAS_REGISTER_SAMPLE_OPS(KEY, RUNNER)                                     \
  TORCH_LIBRARY_IMPL(deepatlas, KEY, m) {                                              \
    m.impl("grid_sample_3d", &::deepatlas::SampleOps<RUNNER>::grid_sample);            \
    m.impl("grid_sample_3d_backward", &::deepatlas::SampleOps<RUNNER>::grid_sample_backward); \
    m.impl("warp", &::deepatlas::SampleOps<RUNNER>::warp);                             \
    m.impl("warp_backward", &::deepatlas::SampleOps<RUNNER>::warp_backward);           \
  }

}  // namespace deepatlas
