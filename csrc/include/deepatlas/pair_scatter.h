// The input gradient of grid_sample / warp as (input index, value) pairs: the deterministic alternative to the
// scatter with atomics on CUDA. Each output point q writes its contributions to fixed slots; the glue then sums
// the pairs per index with index_put_(accumulate=True), which torch performs by a stable sort and an ordered sum
// under torch.use_deterministic_algorithms(True). Slots of point p (flat over [N, D', H', W']):
//   [p * slots_per_point, (p + 1) * slots_per_point),  slots_per_point = C * (8 bilinear | 1 nearest);
// contributions fill them in (channel, corner) order; unused slots (corners outside the volume) get key `trash`.
#pragma once

#include "deepatlas/warp.h"

namespace deepatlas {

struct PairScatterArgs {
  SampleArgs sample;       // as for the scatter; sample.grad_input is the flat accumulation buffer (numel + 1)
  int64_t* keys = nullptr;  // [P * slots_per_point]
  void* values = nullptr;   // [P * slots_per_point], the accumulation type (float32, or float64)
  int64_t slots_per_point = 0;
  int64_t trash = 0;        // index of the extra last element of the flat buffer
};

inline int64_t pair_slots_per_point(const SampleArgs& a) {
  return a.input.size[1] * (a.interp == Interp::Nearest ? 1 : 8);
}

// Records add(pointer, value) calls of sample_backward_input_point as pairs, keyed by the pointer's offset from
// the start of the accumulation buffer.
template <typename TAcc>
struct RecordPairs {
  const TAcc* buffer;
  int64_t* keys;
  TAcc* values;
  int* count;
  DA_HD void operator()(TAcc* p, TAcc v) const {
    keys[*count] = static_cast<int64_t>(p - buffer);
    values[*count] = v;
    ++*count;
  }
};

// Writes all slots of output point q, flat index p.
template <typename acc_t, typename Coords, typename TIn, typename TAcc, typename I>
DA_HD void sample_backward_pairs_point(const Coords& coords, const Volume<const TIn, I>& grad_out,
                                       const Volume<TAcc, I>& grad_input,  // [N_in, C, D, H, W] view of the buffer
                                       const Point<I>& q, int64_t p, Interp interp, Padding padding,
                                       const PairScatterArgs& pairs) {
  int64_t* keys = pairs.keys + p * pairs.slots_per_point;
  TAcc* values = static_cast<TAcc*>(pairs.values) + p * pairs.slots_per_point;
  int count = 0;
  sample_backward_input_point<acc_t>(coords, grad_out, grad_input, q, I(0), grad_input.size[1], interp, padding,
                                     RecordPairs<TAcc>{grad_input.data, keys, values, &count});
  for (int64_t slot = count; slot < pairs.slots_per_point; ++slot) {
    keys[slot] = pairs.trash;
    values[slot] = TAcc(0);
  }
}

}  // namespace deepatlas
