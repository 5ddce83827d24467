// Which instruction set the CPU's flattened loops run in. The default build targets the x86-64 baseline (SSE2) so
// that the library runs on any x86-64 CPU; on g++ it also compiles each flattened loop a second time for AVX2
// (`target("avx2")`: the loop and everything inlined into it) and picks one at run time. AVX2 without FMA: no
// contraction is possible, and no loop reassociates a sum, so both copies give the same bits.
// DEEPATLAS_CPU_BASELINE=1 selects the SSE2 copies at run time (for the tests that compare the two); a build with
// DEEPATLAS_CPU_AVX2=0 (-DDEEPATLAS_NO_AVX2_COPIES) has none, and compiles in about 60% of the time.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__) && \
    !defined(DEEPATLAS_NO_AVX2_COPIES)
#define DA_CPU_AVX2_COPIES 1
#define DA_TARGET_AVX2 __attribute__((target("avx2")))
#endif

namespace deepatlas {

inline bool cpu_has_avx2() {
#ifdef DA_CPU_AVX2_COPIES
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;  // libgcc also checks that the OS saves the AVX registers
  }();
  return supported;
#else
  return false;
#endif
}

inline bool use_avx2_loops() {
  const char* v = std::getenv("DEEPATLAS_CPU_BASELINE");
  return cpu_has_avx2() && !(v != nullptr && v[0] == '1');
}

// What the flattened loops run now: "avx2", or "baseline" (the build's own target: x86-64 SSE2 by default, the
// building machine's with DEEPATLAS_NATIVE=1).
inline std::string cpu_loops() { return use_avx2_loops() ? "avx2" : "baseline"; }

}  // namespace deepatlas
