// CPU backend of the label warps: at::parallel_for over output points -> deepatlas/labels.h.
#include <torch/library.h>

#include "cpu/parallel.h"
#include "deepatlas/labels.h"
#include "deepatlas/sample_dispatch.h"
#include "labels_glue.h"

namespace deepatlas {
namespace {

template <typename TL, typename T, typename I>
void run_typed(const LabelArgs& a) {
  using acc_t = typename AccType<T>::type;
  const SampleArgs& s = a.sample;
  const auto labels = make_volume<const TL, I>(s.input);  // [N_in, 1, D, H, W]
  dispatch_coords<T, I>(s, [&](const auto& coords) {
    if (a.op == LabelOp::Nearest) {
      const auto out = make_volume<TL, I>(s.output);  // [N, 1, D, H, W]
      const TL fill = static_cast<TL>(a.fill);
      parallel_over_points<I>(s, [&](const Point<I>& q) {
        warp_labels_nearest_point<acc_t>(coords, labels, out, q, fill);
      });
    } else if (a.op == LabelOp::Soft) {
      const auto out = make_volume<T, I>(s.output);  // [N, K, D, H, W]
      parallel_over_points<I, Copies::BaselineOnly>(
          s, [&](const Point<I>& q) { warp_labels_soft_point<acc_t>(coords, labels, out, q); });
    } else {
      const auto grad_out = make_volume<const T, I>(s.output);  // [N, K, D, H, W]
      const auto grad_ddf = make_volume<T, I>(s.grad_coords);   // [N, 3, D, H, W]
      parallel_over_points<I, Copies::BaselineOnly>(s, [&](const Point<I>& q) {
        warp_labels_soft_backward_point<acc_t>(coords, labels, grad_out, grad_ddf, q);
      });
    }
  });
}

struct CpuLabelRunner {
  static void run_labels(const LabelArgs& a, c10::Device /*device*/) {
    dispatch_label_types(a.sample, [&](auto label_tag, auto float_tag, auto index_tag) {
      run_typed<typename decltype(label_tag)::type, typename decltype(float_tag)::type,
                typename decltype(index_tag)::type>(a);
    });
  }
};

}  // namespace

DEEPATLAS_REGISTER_LABEL_OPS(CPU, CpuLabelRunner)

}  // namespace deepatlas
