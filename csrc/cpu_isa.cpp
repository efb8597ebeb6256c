// Which CPU kernels run: the best ISA level this CPU has, and the level each thread asked for.
//
// minidora._C exposes cpu_isa(), cpu_isa_best() and set_cpu_isa() to Python (csrc/ops.cpp), for
// minidora.ops.use(cpu_isa=...): tests force every level the CPU has, benchmarks compare them.
#include <string>

#include "nf4_cpu.h"

namespace minidora {

Isa best_isa() {
#if MINIDORA_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
    if (avx512) return Isa::kAvx512;
    return avx2 ? Isa::kAvx2 : Isa::kScalar;
  }();
  return best;
#else
  return Isa::kScalar;
#endif
}

namespace {
// The level forced by set_cpu_isa, per thread (-1: best available), so that threads choosing
// different kernels never see each other's choice. Only the thread that calls an op reads it,
// once, before any parallel region: the worker threads get the level as an argument.
thread_local int t_forced_isa = -1;
}  // namespace

Isa active_isa() { return t_forced_isa >= 0 ? static_cast<Isa>(t_forced_isa) : best_isa(); }

std::string cpu_isa() { return kIsaNames[static_cast<int>(active_isa())]; }

std::string cpu_isa_best() { return kIsaNames[static_cast<int>(best_isa())]; }

bool set_cpu_isa(const std::string& name) {  // for the calling thread only
  if (name == "auto") {
    t_forced_isa = -1;
    return true;
  }
  for (int level = 0; level <= static_cast<int>(best_isa()); ++level) {
    if (name == kIsaNames[level]) {
      t_forced_isa = level;
      return true;
    }
  }
  return false;
}

}  // namespace minidora
