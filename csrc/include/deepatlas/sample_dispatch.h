// Turns a SampleArgs into typed views: picks the index width and builds the coordinate source. Shared by the CPU
// loops and the CUDA launchers (no torch headers).
#pragma once

#include <cstdint>
#include <type_traits>

#include "deepatlas/sample_args.h"
#include "deepatlas/volume.h"
#include "deepatlas/warp.h"

namespace deepatlas {

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<int32_t>) on the fast path, f(TypeTag<int64_t>) when an offset needs 64 bits.
template <typename F>
void dispatch_index(bool index64, F&& f) {
  if (index64) {
    f(TypeTag<int64_t>{});
  } else {
    f(TypeTag<int32_t>{});
  }
}

// f(interp, padding) with both as std::integral_constant, so that the per-point code inlined into f is
// specialised for the mode (the CPU loops use this; on CUDA the mode branches are uniform and cheap).
template <typename F>
void dispatch_modes(Interp interp, Padding padding, F&& f) {
  auto with_padding = [&](auto interp_c) {
    switch (padding) {
      case Padding::Zeros:
        f(interp_c, std::integral_constant<Padding, Padding::Zeros>{});
        break;
      case Padding::Border:
        f(interp_c, std::integral_constant<Padding, Padding::Border>{});
        break;
      default:
        f(interp_c, std::integral_constant<Padding, Padding::Reflection>{});
        break;
    }
  };
  if (interp == Interp::Nearest) {
    with_padding(std::integral_constant<Interp, Interp::Nearest>{});
  } else {
    with_padding(std::integral_constant<Interp, Interp::Bilinear>{});
  }
}

// f(TypeTag<label type>) for the supported integer label dtypes.
template <typename F>
void dispatch_label_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::UInt8:
      f(TypeTag<uint8_t>{});
      break;
    case DType::Int16:
      f(TypeTag<int16_t>{});
      break;
    case DType::Int32:
      f(TypeTag<int32_t>{});
      break;
    default:
      f(TypeTag<int64_t>{});
      break;
  }
}

// f(TypeTag<label>, TypeTag<float type>, TypeTag<index>) for the label ops: integer labels in args.input, a
// float32 / float64 ddf in args.coords.
template <typename F>
void dispatch_label_types(const SampleArgs& args, F&& f) {
  dispatch_index(args.index64, [&](auto index_tag) {
    dispatch_label_dtype(args.input.dtype, [&](auto label_tag) {
      if (args.coords.dtype == DType::Float64) {
        f(label_tag, TypeTag<double>{}, index_tag);
      } else {
        f(label_tag, TypeTag<float>{}, index_tag);
      }
    });
  });
}

// f(coords) with coords a GridCoords or DisplacementCoords view of args.coords.
template <typename TC, typename I, typename F>
void dispatch_coords(const SampleArgs& args, F&& f) {
  const Volume<const TC, I> view = make_volume<const TC, I>(args.coords);
  if (args.kind == CoordKind::Grid) {
    GridCoords<TC, I> grid{view,
                           {static_cast<I>(args.input.size[2]), static_cast<I>(args.input.size[3]),
                            static_cast<I>(args.input.size[4])},
                           args.align_corners};
    f(grid);
  } else {
    DisplacementCoords<TC, I> ddf{view};
    f(ddf);
  }
}

}  // namespace deepatlas
