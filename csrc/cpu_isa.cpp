// Which CPU kernels run: the best ISA level this CPU has, and the level each thread asked for.
//
// minidora._C exposes cpu_isa(), cpu_isa_best() and set_cpu_isa() to Python (csrc/ops.cpp), for
// minidora.ops.use(cpu_isa=...): tests force every level the CPU has, benchmarks compare them.
// MINIDORA_CPU_ISA=<level> caps the levels of the whole process, read once: the suite, a
// tutorial or a benchmark runs as on a CPU whose best level is that one (an AVX2-only CPU on an
// AVX-512 machine). A name that is not a level is ignored, with a line on stderr.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "nf4_cpu.h"

namespace minidora {

namespace {

Isa detected_isa() {
#if MINIDORA_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kScalar;
#else
  return Isa::kScalar;
#endif
}

// The cap of MINIDORA_CPU_ISA, or the detected level when it is unset or names no level.
Isa capped(Isa detected) {
  const char* cap = std::getenv("MINIDORA_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return detected;
  for (int level = 0; level < kIsaCount; ++level) {
    if (std::string(cap) == kIsaNames[level]) {
      return static_cast<Isa>(std::min(level, static_cast<int>(detected)));
    }
  }
  std::fprintf(stderr,
               "minidora: MINIDORA_CPU_ISA=%s is not a level (scalar, avx2, avx512, "
               "avx512bf16); ignored\n",
               cap);
  return detected;
}

}  // namespace

Isa best_isa() {
  static const Isa best = capped(detected_isa());
  return best;
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
