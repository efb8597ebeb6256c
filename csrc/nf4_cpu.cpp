// CPU kernels of the NF4 custom ops: dequantize, dequantize-matmul and its input gradient.
//
// Specification: minidora/nf4.py (`dequantize`) and minidora/ops.py (the reference path
// F.linear(x, dequantize(W, x.dtype), bias)). Kernels come at up to four levels: a scalar
// version that reads like the specification and runs everywhere, and AVX2, AVX-512 and
// AVX-512 BF16 (a bfloat16 dot product for bfloat16 activations) versions, each compiled with a
// `target` attribute and chosen at run time when the CPU has it (no -march=native needed). Tests
// run every level this CPU has (minidora.ops.use(cpu_isa=...)).
//
// Dequantized values are always float32(codebook[code]) * float32(scale), cast once to the
// output dtype: that makes nf4_dequantize bit-exact with the reference. Because every element of
// an absmax block uses the same scale, a block decodes through a 16-entry table
// table[c] = codebook[c] * scale, and the AVX-512 kernels look 16 or 32 codes up at once in it.
//
// The matmul has two regimes:
//   * few rows (M <= kMaxFusedRows, decode-like): the 4-bit codes are decoded in registers inside
//     the dot products; the dense weight never exists in memory, so the kernel reads ~8x fewer
//     bytes than a float32 matmul;
//   * many rows: cache-sized tiles of W are decoded into the activation dtype and handed to the
//     BLAS behind at::mm / at::addmm, each thread decoding and multiplying its own tiles, so
//     decoding costs little next to the matmul and no full dense copy of W is allocated.
// In both, W is first rounded to the activation dtype (as the reference does) and products are
// accumulated in float32 (float64 for float64 activations).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "nf4_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MINIDORA_X86 1
// GCC's own intrinsic headers trip -Wmaybe-uninitialized (their _mm512_undefined_* helpers).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define MINIDORA_X86 0
#endif

namespace minidora {
namespace {

constexpr int64_t kMaxFusedRows = 16;  // M up to this: fused decode-in-the-dot-product
// Dense tile of W in the many-rows regime, decoded and multiplied by one thread: a few times the
// 1 MiB L2, so that BLAS runs on wide enough matrices, while the tiles of all threads stay in the
// 32 MiB L3 (see linear_tiled).
constexpr int64_t kTileBytes = 2 << 20;

// ---- which kernels run ------------------------------------------------------------------------

// Ordered: each level includes the one below. kAvx512Bf16 adds the bfloat16 dot product
// (vdpbf16ps) for bfloat16 activations in the few-rows forward kernel.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};

Isa best_isa() {
#if MINIDORA_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!avx512) return avx2 ? Isa::kAvx2 : Isa::kScalar;
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }();
  return best;
#else
  return Isa::kScalar;
#endif
}

// The level forced by set_cpu_isa, per thread (-1: best available), so that threads choosing
// different kernels never see each other's choice. Only the thread that calls an op reads it, once,
// before any parallel region: the worker threads get the level as an argument.
thread_local int t_forced_isa = -1;

Isa active_isa() { return t_forced_isa >= 0 ? static_cast<Isa>(t_forced_isa) : best_isa(); }

// ---- reading an NF4 weight --------------------------------------------------------------------

// a * b + c with the product rounded to float32 first (never fused into an FMA): the double
// quantization formula of the reference has exactly two float32 roundings.
inline float mul_then_add(float a, float b, float c) {
  float p = a * b;
#if MINIDORA_X86
  __asm__("" : "+x"(p));  // the product must exist as a float32 value
#else
  volatile float vp = p;
  p = vp;
#endif
  return p + c;
}

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
    return mul_then_add(dyn[codes[block]], nested[block / kNestedBlocksize], offset);
  }
  int code(int64_t e) const {
    const uint8_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
  }
  // float32(codebook[code]) * float32(scale): the dequantized value before its single cast.
  float value(int64_t e) const { return kNF4Codebook[code(e)] * scale(e >> shift); }
};

// Keeps contiguous copies of the weight tensors alive while a kernel reads them.
struct NF4Operand {
  at::Tensor packed, absmax, nested, dyn;
  NF4View view;
};

NF4Operand make_operand(const at::Tensor& packed, const at::Tensor& absmax,
                        const c10::optional<at::Tensor>& nested_absmax,
                        const c10::optional<at::Tensor>& nested_code,
                        const c10::optional<at::Tensor>& offset, int64_t blocksize) {
  NF4Operand w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.view.packed = w.packed.data_ptr<uint8_t>();
  w.view.shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  if (w.absmax.scalar_type() == at::kFloat) {
    w.view.absmax = w.absmax.data_ptr<float>();
  } else {
    w.nested = nested_absmax->contiguous();
    w.dyn = nested_code->contiguous();
    w.view.codes = w.absmax.data_ptr<uint8_t>();
    w.view.nested = w.nested.data_ptr<float>();
    w.view.dyn = w.dyn.data_ptr<float>();
    w.view.offset = offset->item<float>();
  }
  return w;
}

// The value an activation dtype T holds for v (round to nearest even), back in float32.
template <typename T> inline float round_through(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
constexpr int round_mode() {  // 0: float32, 1: bfloat16, 2: float16 (see rounded_table)
  return std::is_same<T, c10::BFloat16>::value ? 1 : std::is_same<T, c10::Half>::value ? 2 : 0;
}

// The order in which the fused kernels see a 32-element chunk. The chunk's 16 bytes are
// broadcast to the four 128-bit lanes (a load, no shuffle); a per-lane variable shift then moves
// a different nibble into the low 4 bits of each 32-bit lane, which is all vpermps reads. Lane
// i = 4l + p of the first vector holds element 8p + l, of the second element 8p + 4 + l; the
// activations are stored in the same order once per call, so the inner loop needs two table
// lookups per 32 weights and no other shuffle.
constexpr int kFusedOrder[32] = {0, 8,  16, 24, 1, 9,  17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                                 4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};

// ---- scalar kernels: the readable specification and the portable fallback --------------------

// out[i] = T(value(e0 + i)) for i < n.
template <typename T> void decode_span_scalar(const NF4View& w, int64_t e0, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w.value(e0 + i));
}

// y[m, o] = sum_k x[m, k] * T(W[o, k]), float32 accumulation. xf: [M, K] float32, y: [M, N].
template <typename T> void fused_forward_scalar(const NF4View& w, const float* xf, int64_t M,
                                                int64_t N, int64_t K, float* y) {
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);  // one row of W, decoded
    for (int64_t o = n0; o < n1; ++o) {
      for (int64_t k = 0; k < K; ++k) row[k] = round_through<T>(w.value(o * K + k));
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xf + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xm[k] * row[k];
        y[m * N + o] = acc;
      }
    }
  });
}

// gx[m, k] = sum_o gy[m, o] * T(W[o, k]), float32 accumulation. gy: [M, N], gx: [M, K] zeroed.
template <typename T> void fused_grad_scalar(const NF4View& w, const float* gy, int64_t M,
                                             int64_t N, int64_t K, float* gx) {
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    std::vector<float> row(k1 - k0);  // W[o, k0:k1], decoded
    for (int64_t o = 0; o < N; ++o) {
      for (int64_t k = k0; k < k1; ++k) row[k - k0] = round_through<T>(w.value(o * K + k));
      for (int64_t m = 0; m < M; ++m) {
        const float g = gy[m * N + o];
        float* gxm = gx + m * K;
        for (int64_t k = k0; k < k1; ++k) gxm[k] += g * row[k - k0];
      }
    }
  });
}

// ---- AVX-512 kernels ---------------------------------------------------------------------------
#if MINIDORA_X86

// table[c] = codebook[c] * scale (float32 multiply, exactly the reference's value).
MD_AVX512 inline __m512 scaled_codebook(float scale) {
  return _mm512_mul_ps(_mm512_loadu_ps(kNF4Codebook), _mm512_set1_ps(scale));
}

// bfloat16 bit patterns (low 16 bits of each lane), rounded to nearest even like c10::BFloat16.
MD_AVX512 inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                           16);
}

// v rounded to bfloat16 (nearest even), as float32: the same rounding without the final shifts.
MD_AVX512 inline __m512 bf16_round(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The scaled table rounded to the activation dtype (mode 0/1/2 = float32/bfloat16/float16).
template <int MODE> MD_AVX512 inline __m512 rounded_table(float scale) {
  const __m512 t = scaled_codebook(scale);
  if constexpr (MODE == 1) return bf16_round(t);
  if constexpr (MODE == 2)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return t;
}

// 32 codes from 16 bytes as two vectors of 16 indices in natural order (elements 0..15, 16..31).
// vpermps only reads the low 4 bits of an index, so no masking is needed.
MD_AVX512 inline void chunk_indices(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i high_nibbles = _mm_srli_epi16(bytes, 4);
  lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high_nibbles, bytes));
  hi = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high_nibbles, bytes));
}

MD_AVX512 __attribute__((always_inline)) inline void fused_lookup(const uint8_t* p, __m512 table,
                                                                  __m512& first, __m512& second) {
  // element 8p + l sits in byte 4p + l/2 of the chunk: bits 8*(l/2) of dword p, +4 if l is even
  const __m512i shifts = _mm512_set_epi32(8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4);
  const __m512i bytes =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i idx = _mm512_srlv_epi32(bytes, shifts);
  first = _mm512_permutexvar_ps(idx, table);
  second = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 16), table);  // elements 8p + 4 + l
}

// 32 vpermw indices for the 32 codes of a chunk's 16 bytes, in natural order: word 2j = byte j >> 4
// (element 2j), word 2j+1 = byte j (element 2j+1 in its low 4 bits; vpermw also reads bit 4, the
// high nibble's lowest bit, so the 16-bit tables hold their 16 values twice). The bytes are
// broadcast to the four 128-bit lanes; vpshufb copies byte 4L + i/2 into word i of lane L, with a
// zero high byte, and a per-word shift moves the high nibble of the even words down.
struct WordIndexPattern {
  alignas(64) uint8_t bytes[64];
  constexpr WordIndexPattern() : bytes() {
    for (int i = 0; i < 32; ++i) {
      bytes[2 * i] = static_cast<uint8_t>(4 * (i / 8) + (i % 8) / 2);
      bytes[2 * i + 1] = 0x80;  // vpshufb writes zero
    }
  }
};
constexpr WordIndexPattern kWordIndexPattern;

MD_AVX512 __attribute__((always_inline)) inline __m512i word_indices(const uint8_t* p) {
  const __m512i bytes =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i words = _mm512_shuffle_epi8(bytes, _mm512_load_si512(kWordIndexPattern.bytes));
  return _mm512_srlv_epi16(words, _mm512_set1_epi32(4));  // even words >> 4, odd words >> 0
}

// Decodes 32 elements starting at a multiple of 32 (so inside one block) into out.
template <typename T>
MD_AVX512 inline void decode_chunk(const uint8_t* p, __m512 table, __m512i table16, T* out) {
  if constexpr (sizeof(T) == 2) {
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(word_indices(p), table16));
  } else {
    __m512i ilo, ihi;
    chunk_indices(p, ilo, ihi);
    const __m512 a = _mm512_permutexvar_ps(ilo, table);
    const __m512 b = _mm512_permutexvar_ps(ihi, table);
    if constexpr (std::is_same<T, float>::value) {
      _mm512_storeu_ps(out, a);
      _mm512_storeu_ps(out + 16, b);
    } else {  // double: exact widening
      _mm512_storeu_pd(out, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
      _mm512_storeu_pd(out + 8, _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1)));
      _mm512_storeu_pd(out + 16, _mm512_cvtps_pd(_mm512_castps512_ps256(b)));
      _mm512_storeu_pd(out + 24, _mm512_cvtps_pd(_mm512_extractf32x8_ps(b, 1)));
    }
  }
}

template <typename T> MD_AVX512 inline __m512i table16_of(__m512 table) {
  __m256i h;
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    h = _mm512_cvtepi32_epi16(bf16_bits(table));
  } else {
    h = _mm512_cvtps_ph(table, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// Same contract as decode_span_scalar.
template <typename T>
MD_AVX512 void decode_span_avx512(const NF4View& w, int64_t e0, int64_t n, T* out) {
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(n, (32 - (e0 & 31)) & 31);
  for (; i < head; ++i) out[i] = static_cast<T>(w.value(e0 + i));
  int64_t current = -1;
  __m512 table = _mm512_setzero_ps();
  __m512i table16 = _mm512_setzero_si512();
  for (; i + 32 <= n; i += 32) {
    const int64_t e = e0 + i;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      table = scaled_codebook(w.scale(block));
      if constexpr (sizeof(T) == 2) table16 = table16_of<T>(table);
    }
    decode_chunk<T>(w.packed + (e >> 1), table, table16, out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(w.value(e0 + i));
}

// The NR weight rows of a block are adjacent, so the next block's rows start NR rows further on.
// Each row is only K/2 bytes long (2 KiB for K = 4096), too short a stream for the hardware
// prefetchers to ramp up on; asking for the next block's cache line at the same column while this
// block computes keeps the memory bus busy when W does not fit in the cache (M = 1 is
// memory-bound; docs/bench-nf4-cpu.md has the measurement). group: the first byte of this block's
// first row; called once per 64-byte line (k % 128 == 0). A prefetch past the end of W is harmless.
template <int NR>
__attribute__((always_inline)) inline void prefetch_next_group(const uint8_t* group, int64_t K,
                                                               int64_t k) {
  for (int r = 0; r < NR; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(group + (NR + r) * (K >> 1) + (k >> 1)),
                 _MM_HINT_T0);
}

// dyn[code] for 16 codes (0..255) from the 256-entry table in registers: vpermt2ps looks up 32
// entries at once, and bits 5, 6 and 7 of the code choose among the eight results.
MD_AVX512 inline __m512 lookup256(const __m512 (&t)[16], __m512i code) {
  __m512 v[8];
  for (int j = 0; j < 8; ++j) v[j] = _mm512_permutex2var_ps(t[2 * j], code, t[2 * j + 1]);
  for (int bit = 5, n = 8; bit < 8; ++bit, n /= 2) {
    const __mmask16 m = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << bit));
    for (int j = 0; j < n / 2; ++j) v[j] = _mm512_mask_mov_ps(v[2 * j], m, v[2 * j + 1]);
  }
  return v[0];
}

constexpr int64_t kScaleSpan = 64;  // blocks whose scales the kernels decode at once

// The scales of blocks [b0, b0 + n), as NF4View::scale gives them (bit-exact), 16 at a time.
MD_AVX512 void block_scales(const NF4View& w, int64_t b0, int64_t n, float* out) {
  int64_t i = 0;
  if (w.absmax == nullptr) {
    __m512 dyn[16];
    for (int j = 0; j < 16; ++j) dyn[j] = _mm512_loadu_ps(w.dyn + 16 * j);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 offset = _mm512_set1_ps(w.offset);
    for (; i + 16 <= n; i += 16) {
      const int64_t b = b0 + i;
      const __m512i code =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + b)));
      // 16 consecutive blocks span at most two nested blocks of 256
      const __mmask16 second = _mm512_cmpge_epi32_mask(
          _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b % kNestedBlocksize)), lanes),
          _mm512_set1_epi32(kNestedBlocksize));
      const __m512 nested =
          _mm512_mask_blend_ps(second, _mm512_set1_ps(w.nested[b / kNestedBlocksize]),
                               _mm512_set1_ps(w.nested[(b + 15) / kNestedBlocksize]));
      __m512 p = _mm512_mul_ps(lookup256(dyn, code), nested);
      __asm__("" : "+v"(p));  // rounded to float32 before the offset is added, as mul_then_add
      _mm512_storeu_ps(out + i, _mm512_add_ps(p, offset));
    }
  }
  for (; i < n; ++i) out[i] = w.scale(b0 + i);
}

// One 32-element chunk at column k of NR rows: two lookups per row, then the FMAs.
template <int MR, int NR, int NA>
MD_AVX512 __attribute__((always_inline)) inline void forward_chunk(const uint8_t* const* rows,
                                                                   const __m512* table,
                                                                   const float* xs, int64_t K,
                                                                   int64_t k,
                                                                   __m512 (&acc)[MR][NR][NA]) {
  __m512 first[NR], second[NR];
  if ((k & 127) == 0) prefetch_next_group<NR>(rows[0], K, k);
  for (int r = 0; r < NR; ++r) fused_lookup(rows[r] + (k >> 1), table[r], first[r], second[r]);
  for (int m = 0; m < MR; ++m) {
    const __m512 x0 = _mm512_loadu_ps(xs + m * K + k);
    const __m512 x1 = _mm512_loadu_ps(xs + m * K + k + 16);
    for (int r = 0; r < NR; ++r) {
      acc[m][r][0] = _mm512_fmadd_ps(x0, first[r], acc[m][r][0]);
      acc[m][r][NA - 1] = _mm512_fmadd_ps(x1, second[r], acc[m][r][NA - 1]);
    }
  }
}

// Fused forward for MR activation rows and NR weight rows. K % 32 == 0; xs holds x in float32
// with every 32-chunk stored in kFusedOrder, the order fused_lookup produces.
template <int MR, int NR, int MODE>
MD_AVX512 void fused_forward_block(const NF4View& w, const float* xs, int64_t K, int64_t o0,
                                   float* y, int64_t N) {
  constexpr int NA = MR == 1 ? 2 : 1;  // more independent FMA chains when there is one row
  __m512 acc[MR][NR][NA];
  __m512 table[NR];
  int64_t current[NR];
  for (int r = 0; r < NR; ++r) {
    current[r] = -1;
    table[r] = _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < NA; ++a) acc[m][r][a] = _mm512_setzero_ps();
  }
  const uint8_t* rows[NR];  // the packed bytes of each row
  for (int r = 0; r < NR; ++r) rows[r] = w.packed + (((o0 + r) * K) >> 1);
  const int64_t bs = int64_t{1} << w.shift;
  if (K % bs == 0) {
    // every row starts on a block boundary: one table per row and block, no checks inside; the
    // scales of a span of blocks are decoded at once
    const int64_t nb = K >> w.shift;
    float scales[NR][kScaleSpan];
    for (int64_t b0 = 0; b0 < nb; b0 += kScaleSpan) {
      const int64_t n = std::min(kScaleSpan, nb - b0);
      for (int r = 0; r < NR; ++r) block_scales(w, (o0 + r) * nb + b0, n, scales[r]);
      for (int64_t j = 0; j < n; ++j) {
        for (int r = 0; r < NR; ++r) table[r] = rounded_table<MODE>(scales[r][j]);
        const int64_t kb = (b0 + j) << w.shift;
        for (int64_t k = kb; k < kb + bs; k += 32)
          forward_chunk<MR, NR, NA>(rows, table, xs, K, k, acc);
      }
    }
  } else {
    for (int64_t k = 0; k < K; k += 32) {
      for (int r = 0; r < NR; ++r) {
        const int64_t block = ((o0 + r) * K + k) >> w.shift;
        if (block != current[r]) {
          current[r] = block;
          table[r] = rounded_table<MODE>(w.scale(block));
        }
      }
      forward_chunk<MR, NR, NA>(rows, table, xs, K, k, acc);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      __m512 s = acc[m][r][0];
      if (NA == 2) s = _mm512_add_ps(s, acc[m][r][NA - 1]);
      y[m * N + o0 + r] = _mm512_reduce_add_ps(s);
    }
}

template <int NR, int MODE> MD_AVX512 void fused_forward_rows_mr(const NF4View& w, const float* xs,
                                                                 int64_t M, int64_t K, int64_t o0,
                                                                 float* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = xs + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1:
        fused_forward_block<1, NR, MODE>(w, xm, K, o0, ym, N);
        break;
      case 2:
        fused_forward_block<2, NR, MODE>(w, xm, K, o0, ym, N);
        break;
      case 3:
        fused_forward_block<3, NR, MODE>(w, xm, K, o0, ym, N);
        break;
      default:
        fused_forward_block<4, NR, MODE>(w, xm, K, o0, ym, N);
        break;
    }
  }
}

template <int MODE> MD_AVX512 void fused_forward_avx512_rows(const NF4View& w, const float* xs,
                                                             int64_t M, int64_t N, int64_t K,
                                                             int64_t n0, int64_t n1, float* y) {
  int64_t o = n0;
  for (; o + 4 <= n1; o += 4) fused_forward_rows_mr<4, MODE>(w, xs, M, K, o, y, N);
  for (; o < n1; ++o) fused_forward_rows_mr<1, MODE>(w, xs, M, K, o, y, N);
}

// Fused input gradient for MR gradient rows and G 32-column chunks, summed over all N rows of
// W with the accumulators in registers. Chunk c of gx is accumulated in kFusedOrder.
template <int MR, int G, int MODE>
MD_AVX512 void fused_grad_block(const NF4View& w, const float* gy, int64_t N, int64_t K, int64_t k0,
                                float* gx) {
  __m512 acc[MR][G][2];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < G; ++c) acc[m][c][0] = acc[m][c][1] = _mm512_setzero_ps();
  for (int64_t o = 0; o < N; ++o) {
    int64_t current = -1;
    __m512 table = _mm512_setzero_ps();
    __m512 g[MR];
    for (int m = 0; m < MR; ++m) g[m] = _mm512_set1_ps(gy[m * N + o]);
    for (int c = 0; c < G; ++c) {
      const int64_t e = o * K + k0 + 32 * c;
      const int64_t block = e >> w.shift;
      if (block != current) {
        current = block;
        table = rounded_table<MODE>(w.scale(block));
      }
      __m512 first, second;
      fused_lookup(w.packed + (e >> 1), table, first, second);
      for (int m = 0; m < MR; ++m) {
        acc[m][c][0] = _mm512_fmadd_ps(g[m], first, acc[m][c][0]);
        acc[m][c][1] = _mm512_fmadd_ps(g[m], second, acc[m][c][1]);
      }
    }
  }
  // back to natural order: element e of the chunk is lane natural[e] of (acc0, acc1)
  int natural[32];
  for (int i = 0; i < 32; ++i) natural[kFusedOrder[i]] = i;
  const __m512i first = _mm512_loadu_si512(natural);
  const __m512i second = _mm512_loadu_si512(natural + 16);
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < G; ++c) {
      float* out = gx + m * K + k0 + 32 * c;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(acc[m][c][0], first, acc[m][c][1]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(acc[m][c][0], second, acc[m][c][1]));
    }
}

template <int G, int MODE> MD_AVX512 void fused_grad_cols(const NF4View& w, const float* gy,
                                                          int64_t M, int64_t N, int64_t K,
                                                          int64_t k0, float* gx) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* gm = gy + m0 * N;
    float* out = gx + m0 * K;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1:
        fused_grad_block<1, G, MODE>(w, gm, N, K, k0, out);
        break;
      case 2:
        fused_grad_block<2, G, MODE>(w, gm, N, K, k0, out);
        break;
      case 3:
        fused_grad_block<3, G, MODE>(w, gm, N, K, k0, out);
        break;
      default:
        fused_grad_block<4, G, MODE>(w, gm, N, K, k0, out);
        break;
    }
  }
}

// Chunks [c0, c1) of 32 columns each (K % 32 == 0).
template <int MODE> MD_AVX512 void fused_grad_avx512_chunks(const NF4View& w, const float* gy,
                                                            int64_t M, int64_t N, int64_t K,
                                                            int64_t c0, int64_t c1, float* gx) {
  constexpr int G = 4;
  int64_t c = c0;
  for (; c + G <= c1; c += G) fused_grad_cols<G, MODE>(w, gy, M, N, K, 32 * c, gx);
  for (; c < c1; ++c) fused_grad_cols<1, MODE>(w, gy, M, N, K, 32 * c, gx);
}

// ---- bfloat16 activations with AVX512-BF16: one vdpbf16ps per 32 weights ----------------------
#define MD_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

// The block's 16 values rounded to bfloat16 (nearest even; vcvtneps2bf16 flushes float32
// subnormals, i.e. scales below ~1e-38, to zero), in words 0-15 and again in words 16-31.
MD_AVX512BF16 inline __m512i bf16_table16(float scale) {
  const __m256bh h =
      _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(kNF4Codebook), _mm512_set1_ps(scale)));
  const __m256i t = reinterpret_cast<const __m256i&>(h);
  return _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);  // twice, as word_indices needs
}

// MR rows of bfloat16 x (natural layout) times NR rows of W. The 32 codes of a chunk become 32
// word indices in natural order (word 2j: high nibble of byte j, word 2j+1: its low nibble), one
// vpermw looks the 32 weights up, and vdpbf16ps multiplies them pairwise with x into float32.
template <int MR, int NR>
MD_AVX512BF16 void fused_forward_bf16_block(const NF4View& w, const uint16_t* x, int64_t K,
                                            int64_t o0, float* y, int64_t N) {
  __m512 acc[MR][NR];
  __m512i table[NR];
  const uint8_t* rows[NR];
  int64_t current[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = w.packed + (((o0 + r) * K) >> 1);
    table[r] = _mm512_setzero_si512();
    current[r] = -1;
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  const int64_t bs = int64_t{1} << w.shift;
  const bool aligned = K % bs == 0;  // rows start on block boundaries: a new table every bs
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[NR];
    if ((k & 127) == 0) prefetch_next_group<NR>(rows[0], K, k);
    if (!aligned || (k & (bs - 1)) == 0) {
      for (int r = 0; r < NR; ++r) {
        const int64_t block = ((o0 + r) * K + k) >> w.shift;
        if (block != current[r]) {
          current[r] = block;
          table[r] = bf16_table16(w.scale(block));
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_permutexvar_epi16(word_indices(rows[r] + (k >> 1)), table[r]);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], reinterpret_cast<const __m512bh&>(xv),
                                     reinterpret_cast<const __m512bh&>(wv[r]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + o0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int NR> MD_AVX512BF16 void fused_forward_bf16_rows_mr(const NF4View& w, const uint16_t* x,
                                                                int64_t M, int64_t K, int64_t o0,
                                                                float* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const uint16_t* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1:
        fused_forward_bf16_block<1, NR>(w, xm, K, o0, ym, N);
        break;
      case 2:
        fused_forward_bf16_block<2, NR>(w, xm, K, o0, ym, N);
        break;
      case 3:
        fused_forward_bf16_block<3, NR>(w, xm, K, o0, ym, N);
        break;
      default:
        fused_forward_bf16_block<4, NR>(w, xm, K, o0, ym, N);
        break;
    }
  }
}

MD_AVX512BF16 void fused_forward_bf16_rows(const NF4View& w, const uint16_t* x, int64_t M,
                                           int64_t N, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t o = n0;
  if (M == 1)
    for (; o + 8 <= n1; o += 8) fused_forward_bf16_rows_mr<8>(w, x, M, K, o, y, N);
  for (; o + 4 <= n1; o += 4) fused_forward_bf16_rows_mr<4>(w, x, M, K, o, y, N);
  for (; o < n1; ++o) fused_forward_bf16_rows_mr<1>(w, x, M, K, o, y, N);
}

// ---- AVX2 kernels (CPUs without AVX-512) -------------------------------------------------------
#define MD_AVX2 __attribute__((target("avx2,fma")))

// The 8 codes of elements e..e+7 (e % 8 == 0: 4 whole bytes), each in the low 4 bits of a lane,
// natural order: element i is bits 8*(i/2) + 4*(1 - i%2) of the little-endian word.
MD_AVX2 __attribute__((always_inline)) inline __m256i codes8_avx2(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
}

// A 16-entry lookup with 8-entry permutes: both halves of the table, then a blend on bit 3.
MD_AVX2 __attribute__((always_inline)) inline __m256 lookup16_avx2(__m256i idx, __m256 lo,
                                                                   __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

MD_AVX2 inline __m256i bf16_bits_avx2(__m256 v) {  // as bf16_bits, 8 lanes
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                           16);
}

// The block's table, codebook * scale, rounded through the activation dtype (MODE as in
// rounded_table), as two halves of 8.
template <int MODE> MD_AVX2 inline void table_avx2(float scale, __m256& lo, __m256& hi) {
  const __m256 s = _mm256_set1_ps(scale);
  lo = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook), s);
  hi = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook + 8), s);
  if constexpr (MODE == 1) {
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(lo), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(hi), 16));
  } else if constexpr (MODE == 2) {
    alignas(32) float t[16];
    _mm256_store_ps(t, lo);
    _mm256_store_ps(t + 8, hi);
    for (float& v : t) v = round_through<c10::Half>(v);
    lo = _mm256_load_ps(t);
    hi = _mm256_load_ps(t + 8);
  }
}

template <typename T> MD_AVX2 inline void store8_avx2(__m256 v, T* out) {
  if constexpr (std::is_same<T, float>::value) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same<T, double>::value) {
    _mm256_storeu_pd(out, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(out + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __m256i r = bf16_bits_avx2(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int j = 0; j < 8; ++j) out[j] = static_cast<T>(t[j]);
  }
}

// Same contract as decode_span_scalar.
template <typename T>
MD_AVX2 void decode_span_avx2(const NF4View& w, int64_t e0, int64_t n, T* out) {
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(n, (8 - (e0 & 7)) & 7);
  for (; i < head; ++i) out[i] = static_cast<T>(w.value(e0 + i));
  int64_t current = -1;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {  // 8 elements from a multiple of 8: inside one block
    const int64_t e = e0 + i;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      table_avx2<0>(w.scale(block), lo, hi);
    }
    store8_avx2<T>(lookup16_avx2(codes8_avx2(w.packed + (e >> 1)), lo, hi), out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(w.value(e0 + i));
}

MD_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Fused forward, MR rows of x (float32, natural layout) times NR rows of W; K % 8 == 0.
template <int MR, int NR, int MODE>
MD_AVX2 void fused_forward_avx2_block(const NF4View& w, const float* xf, int64_t K, int64_t o0,
                                      float* y, int64_t N) {
  __m256 acc[MR][NR], lo[NR], hi[NR];
  int64_t current[NR];
  for (int r = 0; r < NR; ++r) {
    current[r] = -1;
    lo[r] = hi[r] = _mm256_setzero_ps();
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_setzero_ps();
  }
  const uint8_t* group = w.packed + ((o0 * K) >> 1);
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NR];
    if ((k & 127) == 0) prefetch_next_group<NR>(group, K, k);
    for (int r = 0; r < NR; ++r) {
      const int64_t e = (o0 + r) * K + k;
      const int64_t block = e >> w.shift;
      if (block != current[r]) {
        current[r] = block;
        table_avx2<MODE>(w.scale(block), lo[r], hi[r]);
      }
      wv[r] = lookup16_avx2(codes8_avx2(w.packed + (e >> 1)), lo[r], hi[r]);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(xf + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + o0 + r] = hsum_avx2(acc[m][r]);
}

template <int MODE> MD_AVX2 void fused_forward_avx2_rows(const NF4View& w, const float* xf,
                                                         int64_t M, int64_t N, int64_t K,
                                                         int64_t n0, int64_t n1, float* y) {
  for (int64_t m0 = 0; m0 < M; m0 += 2) {
    const float* xm = xf + m0 * K;
    float* ym = y + m0 * N;
    int64_t o = n0;
    if (M - m0 == 1) {
      for (; o + 4 <= n1; o += 4) fused_forward_avx2_block<1, 4, MODE>(w, xm, K, o, ym, N);
      for (; o < n1; ++o) fused_forward_avx2_block<1, 1, MODE>(w, xm, K, o, ym, N);
    } else {
      for (; o + 2 <= n1; o += 2) fused_forward_avx2_block<2, 2, MODE>(w, xm, K, o, ym, N);
      for (; o < n1; ++o) fused_forward_avx2_block<2, 1, MODE>(w, xm, K, o, ym, N);
    }
  }
}

#endif  // MINIDORA_X86

// ---- dispatch between the two kernel sets ------------------------------------------------------

template <typename T> void decode_span(Isa isa, const NF4View& w, int64_t e0, int64_t n, T* out) {
#if MINIDORA_X86
  if (isa >= Isa::kAvx512) return decode_span_avx512<T>(w, e0, n, out);
  if (isa == Isa::kAvx2) return decode_span_avx2<T>(w, e0, n, out);
#endif
  decode_span_scalar<T>(w, e0, n, out);
}

// Decodes elements [e0, e0 + n) into out, in parallel over 32-element chunks.
template <typename T>
void decode_parallel(Isa isa, const NF4View& w, int64_t e0, int64_t n, T* out) {
  const int64_t chunks = (n + 31) / 32;
  at::parallel_for(0, chunks, 1024, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * 32, end = std::min(n, c1 * 32);
    decode_span<T>(isa, w, e0 + begin, end - begin, out + begin);
  });
}

// x [M, K] (T) -> float32, in the layout the fused forward kernel reads.
template <typename T>
std::vector<float> activations_to_float(const at::Tensor& x2d, bool interleave_chunks) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const T* x = x2d.data_ptr<T>();
  std::vector<float> out(M * K);
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * K;
    float* om = out.data() + m * K;
    if (!interleave_chunks) {
      for (int64_t k = 0; k < K; ++k) om[k] = static_cast<float>(xm[k]);
      continue;
    }
    for (int64_t k = 0; k < K; k += 32)
      for (int i = 0; i < 32; ++i) om[k + i] = static_cast<float>(xm[k + kFusedOrder[i]]);
  }
  return out;
}

// Few rows: decode inside the dot products. y: [M, N] in T.
template <typename T> at::Tensor linear_fused(Isa isa, const NF4View& w, const at::Tensor& x2d,
                                              const c10::optional<at::Tensor>& bias, int64_t N,
                                              int64_t K) {
  const int64_t M = x2d.size(0);
  std::vector<float> yf(M * N);
  bool done = false;
#if MINIDORA_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (isa >= Isa::kAvx512Bf16 && K % 32 == 0) {  // bfloat16 x used as it is
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(x2d.data_ptr<T>());
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        fused_forward_bf16_rows(w, xb, M, N, K, n0, n1, yf.data());
      });
      done = true;
    }
  }
#endif
  if (!done) {
    const bool vector = isa >= Isa::kAvx512 && K % 32 == 0;
    const std::vector<float> xf = activations_to_float<T>(x2d, vector);
    const bool avx2 = !vector && isa >= Isa::kAvx2 && K % 8 == 0;
#if MINIDORA_X86
    if (vector) {
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        fused_forward_avx512_rows<round_mode<T>()>(w, xf.data(), M, N, K, n0, n1, yf.data());
      });
    } else if (avx2) {
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        fused_forward_avx2_rows<round_mode<T>()>(w, xf.data(), M, N, K, n0, n1, yf.data());
      });
    }
#endif
    if (!vector && !avx2) fused_forward_scalar<T>(w, xf.data(), M, N, K, yf.data());
  }
  at::Tensor y = at::empty({M, N}, x2d.options());
  T* out = y.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < N; ++o)
      out[m * N + o] = static_cast<T>(yf[m * N + o] + (b ? static_cast<float>(b[o]) : 0.f));
  return y;
}

// A 1-D scratch tensor of n elements, reused between calls of the same thread: a fresh
// multi-megabyte allocation would cost a page fault per 4 KiB on every call.
at::Tensor workspace(int64_t n, const at::TensorOptions& options) {
  thread_local at::Tensor bytes;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (!bytes.defined() || bytes.numel() < nbytes) bytes = at::empty({nbytes}, at::kByte);
  return at::from_blob(bytes.data_ptr(), {n}, options);
}

// Lines (rows or columns of W, `total` of them, `bytes_per_line` each once decoded) per tile: about
// kTileBytes, a multiple of `multiple`, and few enough that every thread gets two tiles.
int64_t tile_lines(int64_t total, int64_t bytes_per_line, int64_t multiple) {
  const int64_t fit = kTileBytes / bytes_per_line;
  const int64_t share = (total + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t lines = (std::min(fit, share) + multiple - 1) / multiple * multiple;
  return std::min(total, std::max(multiple, lines));
}

// Many rows: tiles of whole rows of W, y[:, tile] = x @ tile^T by BLAS. Each thread decodes its own
// tiles into its own buffer and multiplies them itself (BLAS called inside a parallel region runs
// on the calling thread): the tile never leaves the core that wrote it. When the threads shared
// one tile (one decode in parallel, then one multi-threaded BLAS call), decoding into the buffer
// that the previous product had just read was at times several times slower: each store first
// had to take its line back from the other core's cache (docs/bench-nf4-cpu.md).
template <typename T> at::Tensor linear_tiled(Isa isa, const NF4View& w, const at::Tensor& x2d,
                                              const c10::optional<at::Tensor>& bias, int64_t N,
                                              int64_t K) {
  const int64_t M = x2d.size(0);
  at::Tensor y = at::empty({M, N}, x2d.options());
  const int64_t rows = tile_lines(N, K * sizeof(T), 16);
  const at::ThreadLocalState
      state;  // the caller's dispatch state, for the BLAS calls of every thread
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard guard(state);
    at::Tensor buffer = workspace(rows * K, x2d.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, nt = std::min(rows, N - n0);
      decode_span<T>(isa, w, n0 * K, nt * K, buffer.data_ptr<T>());
      const at::Tensor tile = buffer.narrow(0, 0, nt * K).view({nt, K});  // W[n0:n0+nt, :]
      at::Tensor out = y.narrow(1, n0, nt);
      if (bias.has_value()) {
        at::addmm_out(out, bias->narrow(0, n0, nt), x2d, tile.t());
      } else {
        at::mm_out(out, x2d, tile.t());
      }
    }
  });
  return y;
}

// Few rows of grad_y: gx = gy @ W with the decode fused into the accumulation.
template <typename T>
at::Tensor grad_fused(Isa isa, const NF4View& w, const at::Tensor& gy2d, int64_t N, int64_t K) {
  const int64_t M = gy2d.size(0);
  const std::vector<float> gf = activations_to_float<T>(gy2d, false);
  std::vector<float> gx(M * K, 0.f);
  const bool vector = isa >= Isa::kAvx512 && K % 32 == 0;
#if MINIDORA_X86
  if (vector) {
    at::parallel_for(0, K / 32, 4, [&](int64_t c0, int64_t c1) {
      fused_grad_avx512_chunks<round_mode<T>()>(w, gf.data(), M, N, K, c0, c1, gx.data());
    });
  }
#endif
  if (!vector) fused_grad_scalar<T>(w, gf.data(), M, N, K, gx.data());
  at::Tensor out = at::empty({M, K}, gy2d.options());
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) o[i] = static_cast<T>(gx[i]);
  return out;
}

// Asks for the packed bytes and the scale codes of elements [e, e + n) to be brought into the
// cache.
inline void prefetch_span(const NF4View& w, int64_t e, int64_t n) {
  const uint8_t* first = w.packed + (e >> 1);
  const uint8_t* last = w.packed + ((e + n - 1) >> 1);
  for (const uint8_t* p = first; p < last; p += 64) __builtin_prefetch(p);
  __builtin_prefetch(last);
  __builtin_prefetch(w.codes != nullptr ? static_cast<const void*>(w.codes + (e >> w.shift))
                                        : static_cast<const void*>(w.absmax + (e >> w.shift)));
}

// A column tile reads a short piece of every row of W, rows 2 KiB apart (for in = 4096), which
// the hardware prefetchers do not follow: the decode asks for the row kRowsAhead further on.
constexpr int64_t kRowsAhead = 4;

// Many rows, gx = gy @ W, with each thread owning its tiles as in linear_tiled.
// 16-bit dtypes: column tiles W[:, k0:k0+kt], gx[:, k0:k0+kt] = gy @ tile, so that every element of
// gx is one complete sum accumulated in float32 by BLAS (no partial sums rounded to 16 bits).
// float32 / float64: row tiles W[n0:n0+nt, :], which read W in order; each thread adds
// gy[:, n0:n0+nt] @ tile into its own float32/float64 sum, and the sums are added at the end.
template <typename T>
at::Tensor grad_tiled(Isa isa, const NF4View& w, const at::Tensor& gy2d, int64_t N, int64_t K) {
  const int64_t M = gy2d.size(0);
  at::Tensor gx = at::empty({M, K}, gy2d.options());
  const at::ThreadLocalState state;  // as in linear_tiled
  if constexpr (sizeof(T) == 2) {
    const int64_t cols = tile_lines(K, N * sizeof(T), 128);  // whole 64-byte lines of each row
    at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor buffer = workspace(N * cols, gy2d.options());
      T* buf = buffer.data_ptr<T>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * cols, kt = std::min(cols, K - k0);
        for (int64_t o = 0; o < N; ++o) {
          if (o + kRowsAhead < N) prefetch_span(w, (o + kRowsAhead) * K + k0, kt);
          decode_span<T>(isa, w, o * K + k0, kt, buf + o * kt);
        }
        const at::Tensor tile = buffer.narrow(0, 0, N * kt).view({N, kt});  // W[:, k0:k0+kt]
        at::Tensor out = gx.narrow(1, k0, kt);
        at::mm_out(out, gy2d, tile);
      }
    });
  } else {
    const int64_t rows = tile_lines(N, K * sizeof(T), 16);
    std::vector<at::Tensor> sums(at::get_num_threads());  // one per thread that had tiles
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor buffer = workspace(rows * K, gy2d.options());
      at::Tensor sum = t0 == 0 ? gx : at::empty({M, K}, gy2d.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, nt = std::min(rows, N - n0);
        decode_span<T>(isa, w, n0 * K, nt * K, buffer.data_ptr<T>());
        const at::Tensor tile = buffer.narrow(0, 0, nt * K).view({nt, K});  // W[n0:n0+nt, :]
        if (t == t0) {
          at::mm_out(sum, gy2d.narrow(1, n0, nt), tile);
        } else {
          sum.addmm_(gy2d.narrow(1, n0, nt), tile);
        }
      }
      if (t0 != 0) sums[at::get_thread_num()] = sum;
    });
    for (const at::Tensor& s : sums)
      if (s.defined()) gx.add_(s);
  }
  return gx;
}

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": the CPU kernel got ", name, " on ", t.device());
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// ---- the ops -----------------------------------------------------------------------------------

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code,
                              const c10::optional<at::Tensor>& offset, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "nf4_dequantize";
  TORCH_CHECK(is_float_activation(dtype), op,
              ": dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  const int64_t numel = shape_numel(op, shape);
  check_cpu(op, packed, "packed");
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   packed.device(), "packed");
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize", [&] {
    decode_parallel<scalar_t>(isa, w.view, 0, numel, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize,
                          int64_t out_features, int64_t in_features,
                          const c10::optional<at::Tensor>& bias) {
  const char* op = "nf4_linear";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t rows =
      check_activation(op, "x", x, in_features, "in_features", out_features, "out_features");
  check_cpu(op, x, "x");
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   x.device(), "x");
  check_bias(op, bias, x, out_features);
  const auto out_shape = with_last(x.sizes(), out_features);
  if (rows == 0) return at::empty(out_shape, x.options());
  const c10::optional<at::Tensor> b =
      bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const at::Tensor x2d = x.reshape({rows, in_features}).contiguous();  // [M, K]
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  const Isa isa = active_isa();
  const bool fused = x2d.size(0) <= kMaxFusedRows && x.scalar_type() != at::kDouble;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nf4_linear", [&] {
    y = fused ? linear_fused<scalar_t>(isa, w.view, x2d, b, out_features, in_features)
              : linear_tiled<scalar_t>(isa, w.view, x2d, b, out_features, in_features);
  });
  return y.view(out_shape);  // [..., N]
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed,
                                     const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code,
                                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t out_features, int64_t in_features) {
  const char* op = "nf4_linear_grad_input";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t rows = check_activation(op, "grad_y", grad_y, out_features, "out_features",
                                        in_features, "in_features");
  check_cpu(op, grad_y, "grad_y");
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   grad_y.device(), "grad_y");
  const auto out_shape = with_last(grad_y.sizes(), in_features);
  if (rows == 0) return at::empty(out_shape, grad_y.options());
  const at::Tensor gy2d = grad_y.reshape({rows, out_features}).contiguous();  // [M, N]
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  const Isa isa = active_isa();
  const bool fused = gy2d.size(0) <= kMaxFusedRows && grad_y.scalar_type() != at::kDouble;
  at::Tensor gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_y.scalar_type(), "nf4_linear_grad_input", [&] {
        gx = fused ? grad_fused<scalar_t>(isa, w.view, gy2d, out_features, in_features)
                   : grad_tiled<scalar_t>(isa, w.view, gy2d, out_features, in_features);
      });
  return gx.view(out_shape);  // [..., K]
}

}  // namespace

// ---- kernel selection, exposed to Python through minidora._C (see ops.cpp) ---------------------

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

TORCH_LIBRARY_IMPL(minidora, CPU, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace minidora
