// Profiling driver for the deepatlas sampler ops, built by CMakeLists.txt (target deepatlas_profile). It calls the
// ops through the dispatcher, as Python does, so it measures exactly the registered kernels and nothing else:
// one warm-up call, then K timed calls, each followed by a device synchronise on CUDA. Meant to run under
// ncu / nsys / perf, e.g.
//   nsys profile build/cmake/deepatlas_profile --op warp --size 128 128 128 --device cuda --iters 20
//   ncu --kernel-name regex:sample build/cmake/deepatlas_profile --op grid_sample --device cuda --iters 1
//
// Usage: deepatlas_profile [--op warp|grid_sample] [--size D H W] [--channels C] [--batch N] [--iters K]
//                          [--device cpu|cuda] [--dtype float|double] [--interp bilinear|nearest]
//                          [--padding zeros|border|reflection] [--align-corners] [--backward] [--threads T]
// Prints the median (and min / max) time per call in ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Options {
  std::string op = "warp";
  std::array<int64_t, 3> size = {64, 64, 64};
  int64_t channels = 1;
  int64_t batch = 1;
  int iters = 10;
  std::string device = "cpu";
  std::string dtype = "float";
  int64_t interp = 0;   // 0 bilinear, 1 nearest
  int64_t padding = 0;  // 0 zeros, 1 border, 2 reflection
  bool align_corners = false;
  bool backward = false;
  int threads = 0;      // 0: torch's default
};

[[noreturn]] void usage(const char* prog, const std::string& error = "") {
  if (!error.empty()) std::fprintf(stderr, "error: %s\n", error.c_str());
  std::fprintf(stderr,
               "usage: %s [--op warp|grid_sample] [--size D H W] [--channels C] [--batch N] [--iters K]\n"
               "          [--device cpu|cuda] [--dtype float|double] [--interp bilinear|nearest]\n"
               "          [--padding zeros|border|reflection] [--align-corners] [--backward] [--threads T]\n",
               prog);
  std::exit(error.empty() ? 0 : 2);
}

int64_t to_int(const char* prog, const std::string& flag, const char* text) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || v < 0) usage(prog, "bad value for " + flag + ": " + text);
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  const char* prog = argv[0];
  auto need = [&](int i, int n, const std::string& flag) {
    if (i + n >= argc) usage(prog, flag + " needs " + std::to_string(n) + " value(s)");
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      usage(prog);
    } else if (a == "--op") {
      need(i, 1, a);
      o.op = argv[++i];
      if (o.op == "grid_sample_3d") o.op = "grid_sample";
      if (o.op != "warp" && o.op != "grid_sample") usage(prog, "--op must be warp or grid_sample");
    } else if (a == "--size") {
      need(i, 3, a);
      for (auto& s : o.size) s = to_int(prog, a, argv[++i]);
    } else if (a == "--channels") {
      need(i, 1, a);
      o.channels = to_int(prog, a, argv[++i]);
    } else if (a == "--batch") {
      need(i, 1, a);
      o.batch = to_int(prog, a, argv[++i]);
    } else if (a == "--iters") {
      need(i, 1, a);
      o.iters = static_cast<int>(to_int(prog, a, argv[++i]));
      if (o.iters < 1) usage(prog, "--iters must be >= 1");
    } else if (a == "--device") {
      need(i, 1, a);
      o.device = argv[++i];
      if (o.device != "cpu" && o.device != "cuda") usage(prog, "--device must be cpu or cuda");
    } else if (a == "--dtype") {
      need(i, 1, a);
      o.dtype = argv[++i];
      if (o.dtype != "float" && o.dtype != "double") usage(prog, "--dtype must be float or double");
    } else if (a == "--interp") {
      need(i, 1, a);
      const std::string v = argv[++i];
      if (v == "bilinear" || v == "trilinear") o.interp = 0;
      else if (v == "nearest") o.interp = 1;
      else usage(prog, "--interp must be bilinear or nearest");
    } else if (a == "--padding") {
      need(i, 1, a);
      const std::string v = argv[++i];
      if (v == "zeros") o.padding = 0;
      else if (v == "border") o.padding = 1;
      else if (v == "reflection") o.padding = 2;
      else usage(prog, "--padding must be zeros, border or reflection");
    } else if (a == "--align-corners") {
      o.align_corners = true;
    } else if (a == "--backward") {
      o.backward = true;
    } else if (a == "--threads") {
      need(i, 1, a);
      o.threads = static_cast<int>(to_int(prog, a, argv[++i]));
    } else {
      usage(prog, "unknown argument " + a);
    }
  }
  return o;
}

using WarpFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using WarpBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          int64_t, int64_t, std::array<bool, 2>);
using GridSampleFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool);
using GridSampleBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, int64_t, int64_t, bool,
                                                                std::array<bool, 2>);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void synchronize(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

int run(const Options& o) {
  const at::Device device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    std::fprintf(stderr, "error: --device cuda but torch sees no CUDA device\n");
    return 1;
  }
#ifndef DEEPATLAS_WITH_CUDA
  if (device.is_cuda()) {
    std::fprintf(stderr, "warning: built without DEEPATLAS_CUDA; the ops have no CUDA kernel in this binary\n");
  }
#endif
  if (o.threads > 0) at::set_num_threads(o.threads);
  c10::InferenceMode inference_mode;  // plain kernel calls: no autograd bookkeeping

  const auto opts = at::TensorOptions().device(device).dtype(o.dtype == "double" ? at::kDouble : at::kFloat);
  const auto [d, h, w] = o.size;
  const int64_t n = o.batch, c = o.channels;
  at::manual_seed(0);
  const at::Tensor input = at::randn({n, c, d, h, w}, opts);
  at::Tensor coords;  // warp: ddf [N, 3, D, H, W] in voxels; grid_sample: grid [N, D, H, W, 3] in [-1, 1]
  if (o.op == "warp") {
    coords = at::randn({n, 3, d, h, w}, opts) * 2.0;
  } else {
    coords = at::rand({n, d, h, w, 3}, opts) * 2.2 - 1.1;
  }
  const at::Tensor grad_output = at::randn({n, c, d, h, w}, opts);
  const std::array<bool, 2> mask = {true, true};

  std::function<void()> call;
  std::string name;
  if (o.op == "warp" && !o.backward) {
    auto op = find_op<WarpFn>("deepatlas::warp");
    call = [=] { op.call(input, coords, o.interp, o.padding); };
    name = "deepatlas::warp";
  } else if (o.op == "warp") {
    auto op = find_op<WarpBackwardFn>("deepatlas::warp_backward");
    call = [=] { op.call(grad_output, input, coords, o.interp, o.padding, mask); };
    name = "deepatlas::warp_backward";
  } else if (!o.backward) {
    auto op = find_op<GridSampleFn>("deepatlas::grid_sample_3d");
    call = [=] { op.call(input, coords, o.interp, o.padding, o.align_corners); };
    name = "deepatlas::grid_sample_3d";
  } else {
    auto op = find_op<GridSampleBackwardFn>("deepatlas::grid_sample_3d_backward");
    call = [=] { op.call(grad_output, input, coords, o.interp, o.padding, o.align_corners, mask); };
    name = "deepatlas::grid_sample_3d_backward";
  }

  // Warm-up: first-touch allocation, CUDA context and module load, OpenMP thread pool start.
  call();
  synchronize(device);

  std::vector<double> ms;
  ms.reserve(o.iters);
  for (int i = 0; i < o.iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    synchronize(device);
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const size_t k = sorted.size();
  const double median = k % 2 ? sorted[k / 2] : 0.5 * (sorted[k / 2 - 1] + sorted[k / 2]);

  std::printf("%s  device=%s dtype=%s N=%lld C=%lld size=%lldx%lldx%lld interp=%lld padding=%lld%s threads=%d\n",
              name.c_str(), o.device.c_str(), o.dtype.c_str(), static_cast<long long>(n),
              static_cast<long long>(c), static_cast<long long>(d), static_cast<long long>(h),
              static_cast<long long>(w), static_cast<long long>(o.interp), static_cast<long long>(o.padding),
              o.op == "grid_sample" ? (o.align_corners ? " align_corners=1" : " align_corners=0") : "",
              at::get_num_threads());
  std::printf("median %.4f ms/call  (min %.4f, max %.4f, %d iters after 1 warm-up)\n", median, sorted.front(),
              sorted.back(), o.iters);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
