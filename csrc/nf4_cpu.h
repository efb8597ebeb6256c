// What the CPU kernel files share: the ISA levels, an NF4 weight as raw pointers, the rounding of a
// weight to the activation dtype, and the kernels every ISA level provides.
//
//   csrc/nf4_cpu.cpp          the ops: checks, the choice of regime and level, threads and tiles
//   csrc/nf4_cpu_scalar.cpp   namespace scalar: plain loops, the specification of the other levels
//                             and the kernels of every CPU
//   csrc/nf4_cpu_avx2.cpp     namespace avx2:   kernels for CPUs with AVX2 + FMA
//   csrc/nf4_cpu_avx512.cpp   namespace avx512: kernels for AVX-512 (F, BW, VL, DQ), and the
//                             bfloat16 dot product of AVX512_BF16
//   csrc/cpu_isa.cpp          which levels this CPU has, and the level each thread asked for
//
// Every level defines the same kernels (MD_LEVEL_KERNELS below), called by nf4_cpu.cpp on one
// thread's share of the work. The vector files compile their inner functions with a `target`
// attribute (MD_TARGET_*), not the whole build with -march: the library runs on any x86-64 CPU,
// and a level's kernels run only where best_isa() found it. A new level is a new file with its own
// namespace, a value of Isa, a line in cpu_isa.cpp and a case in the dispatch of nf4_cpu.cpp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "nf4_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define MINIDORA_X86 1
#define MD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define MD_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#else
#define MINIDORA_X86 0
#endif

namespace minidora {

// ---- ISA levels (csrc/cpu_isa.cpp) --------------------------------------------------------------

// Ordered: each level includes the ones below it. kAvx512Bf16 adds the bfloat16 dot product
// (vdpbf16ps) for bfloat16 activations in the few-rows forward kernel.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kIsaCount = 4;
constexpr const char* kIsaNames[kIsaCount] = {"scalar", "avx2", "avx512", "avx512bf16"};

Isa best_isa();    // the best level this CPU supports
Isa active_isa();  // the level the calling thread asked for (set_cpu_isa), else best_isa()

// ---- an NF4 weight as raw pointers --------------------------------------------------------------

// Raw pointers to one NF4 weight, flattened row-major (element e of W[out, in] is e = o*in + k).
struct NF4View {
  const uint8_t* packed = nullptr;  // [ceil(n/2)], element 2i in the high nibble of byte i
  const float* absmax = nullptr;    // [n_blocks] float32 scales (no double quantization)
  const uint8_t* codes = nullptr;   // [n_blocks] uint8 scale codes (double quantization)
  const float* nested = nullptr;    // [ceil(n_blocks/256)]
  const float* dyn = nullptr;       // [256] dynamic map
  float offset = 0.f;
  int shift = 6;  // log2(blocksize)

  float scale(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return dq_scale(dyn[codes[block]], nested[block / kNestedBlocksize], offset);
  }
  int code(int64_t e) const {
    const uint8_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
  }
  // float32(codebook[code]) * float32(scale): the dequantized value before its single cast.
  float value(int64_t e) const { return kNF4Codebook[code(e)] * scale(e >> shift); }
};

// ---- rounding a weight to the activation dtype --------------------------------------------------

// The matmul kernels round each weight to the activation dtype, as the reference does, and then
// multiply in float32: Rounding names the dtype they round through.
enum class Rounding : int { kFloat32, kBFloat16, kFloat16 };

template <typename T> constexpr Rounding rounding_of() {
  if constexpr (std::is_same<T, c10::BFloat16>::value) return Rounding::kBFloat16;
  if constexpr (std::is_same<T, c10::Half>::value) return Rounding::kFloat16;
  return Rounding::kFloat32;
}

// The value an activation dtype T holds for v (round to nearest even), back in float32.
template <typename T> inline float round_through(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The same, with the dtype named by its Rounding.
template <Rounding R> inline float round_to(float v) {
  if constexpr (R == Rounding::kBFloat16) return round_through<c10::BFloat16>(v);
  if constexpr (R == Rounding::kFloat16) return round_through<c10::Half>(v);
  return v;
}

// float32 bit patterns rounded to bfloat16, nearest even (as c10::BFloat16 for every finite value):
// the bfloat16 bits are the high 16 bits of the result, the low 16 bits are left to the caller
// (shift them out for a bfloat16, mask them off for the float32 value). U is uint32_t or a GCC
// vector of uint32_t: the vector kernels call it on whole registers, and it compiles to that
// kernel's instructions wherever it is inlined.
template <typename U> __attribute__((always_inline)) inline U round_bf16_bits(U bits) {
  return bits + ((bits >> 16) & 1) + 0x7FFF;
}

// ---- prefetching the next rows of W ------------------------------------------------------------

// The few-rows kernels read NR adjacent rows of W at once, so the next group's rows start NR rows
// further on. Each row is only K/2 bytes long (2 KiB for K = 4096), too short a stream for the
// hardware prefetchers to ramp up on: asking for the next group's line at the same column while
// this group computes keeps the memory bus busy when W is not in the cache (M = 1 is bound by
// memory; docs/bench-nf4-cpu.md). group: the first byte of this group's first row; called once
// per 64-byte line (k % 128 == 0). A prefetch past the end of W is harmless.
template <int NR>
__attribute__((always_inline)) inline void prefetch_next_group(const uint8_t* group, int64_t K,
                                                               int64_t k) {
  for (int r = 0; r < NR; ++r) __builtin_prefetch(group + (NR + r) * (K >> 1) + (k >> 1), 0, 3);
}

// ---- the M-tile dispatcher ----------------------------------------------------------------------

template <int MR, typename Tile>
__attribute__((always_inline)) inline void call_tile(int64_t rows, int64_t m0, Tile& tile) {
  if constexpr (MR > 1) {
    if (rows < MR) return call_tile<MR - 1>(rows, m0, tile);
  }
  tile.template operator()<MR>(m0);
}

// The matmul kernels take MR rows of the activations at once, MR a template argument so that
// their accumulators are arrays of registers. This calls tile.template operator()<MR>(m0) for
// m0 = 0, MT, 2 MT, ... < M, with MR = min(MT, M - m0): tiles of MT rows, then the rest.
template <int MT, typename Tile> inline void for_each_m_tile(int64_t M, Tile&& tile) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) call_tile<MT>(std::min<int64_t>(MT, M - m0), m0, tile);
}

// ---- the kernels of each ISA level --------------------------------------------------------------
// T: float, double, c10::BFloat16 or c10::Half; element e of W [N, K] as in NF4View. x, gy and gx
// are float32, row-major; every sum is accumulated in float32.
//   decode_span(w, e0, n, out)       out[i] = T(value(e0 + i)) for i < n; bit-exact with the
//                                    reference.
//   decode_rounded(w, e0, n, out)    out[i] = float(T(value(e0 + i))): the weights as T holds them,
//                                    in float32 (for a float32 BLAS where T has no native
//                                    arithmetic); bit-exact.
//   stage_activations(x, M, K, out)  x [M, K] of T -> float32, in the order forward_rows reads.
//   forward_rows(w, xs, M, N, K, n0, n1, y)
//                                    y[m, o] = sum_k xs[m, k] * T(W[o, k]) for the rows o in
//                                    [n0, n1) of W and every m < M; y: [M, N]; xs as
//                                    stage_activations of the same level wrote it.
//   grad_unit(K)                     the columns grad_columns takes per step.
//   grad_columns(w, gy, M, N, K, k0, k1, gx)
//                                    gx[m, k] = sum_o gy[m, o] * T(W[o, k]) for the columns k in
//                                    [k0, k1) (multiples of grad_unit(K)) and every m < M;
//                                    gy: [M, N], gx: [M, K] (written, not added to).
// forward_rows and grad_columns need K % kChunk == 0, kChunk a constant of the level. The entry
// points have no target attribute (in C++ a declaration and a definition with different targets
// would declare two versions of one function): each calls the targeted code of its file.
#define MD_LEVEL_KERNELS                                                                           \
  template <typename T> void decode_span(const NF4View& w, int64_t e0, int64_t n, T* out);         \
  template <typename T> void decode_rounded(const NF4View& w, int64_t e0, int64_t n, float* out);  \
  template <typename T> void stage_activations(const T* x, int64_t M, int64_t K, float* out);      \
  template <typename T> void forward_rows(const NF4View& w, const float* xs, int64_t M, int64_t N, \
                                          int64_t K, int64_t n0, int64_t n1, float* y);            \
  int64_t grad_unit(int64_t K);                                                                    \
  template <typename T> void grad_columns(const NF4View& w, const float* gy, int64_t M, int64_t N, \
                                          int64_t K, int64_t k0, int64_t k1, float* gx);

// The instances every level compiles, for T in float, double, c10::BFloat16 and c10::Half.
#define MD_INSTANTIATE_LEVEL_KERNELS_FOR(T)                                                       \
  template void decode_span<T>(const NF4View&, int64_t, int64_t, T*);                             \
  template void decode_rounded<T>(const NF4View&, int64_t, int64_t, float*);                      \
  template void stage_activations<T>(const T*, int64_t, int64_t, float*);                         \
  template void forward_rows<T>(const NF4View&, const float*, int64_t, int64_t, int64_t, int64_t, \
                                int64_t, float*);                                                 \
  template void grad_columns<T>(const NF4View&, const float*, int64_t, int64_t, int64_t, int64_t, \
                                int64_t, float*);
#define MD_INSTANTIATE_LEVEL_KERNELS              \
  MD_INSTANTIATE_LEVEL_KERNELS_FOR(float)         \
  MD_INSTANTIATE_LEVEL_KERNELS_FOR(double)        \
  MD_INSTANTIATE_LEVEL_KERNELS_FOR(c10::BFloat16) \
  MD_INSTANTIATE_LEVEL_KERNELS_FOR(c10::Half)

namespace scalar {
constexpr int64_t kChunk = 1;  // any K
MD_LEVEL_KERNELS
}  // namespace scalar

#if MINIDORA_X86
namespace avx2 {
constexpr int64_t kChunk = 8;
MD_LEVEL_KERNELS
}  // namespace avx2

namespace avx512 {
constexpr int64_t kChunk = 32;
MD_LEVEL_KERNELS
// Isa::kAvx512Bf16: forward_rows for bfloat16 activations (vdpbf16ps), K % kChunk == 0, x [M, K]
// bfloat16 in the order stage_bf16 wrote (which depends on the weight's blocksize and K).
void stage_bf16(const NF4View& w, const c10::BFloat16* x, int64_t M, int64_t K, c10::BFloat16* out);
void forward_rows_bf16(const NF4View& w, const c10::BFloat16* x, int64_t M, int64_t N, int64_t K,
                       int64_t n0, int64_t n1, float* y);
}  // namespace avx512
#endif  // MINIDORA_X86

}  // namespace minidora
