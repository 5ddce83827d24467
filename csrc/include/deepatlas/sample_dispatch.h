// Turns a SampleArgs into typed views: picks the index width and builds the coordinate source. Shared by the CPU
// loops and the CUDA launchers (no torch headers).
#pragma once

#include <cstdint>

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
