// AVX2 kernels of the NF4 ops (CPUs without AVX-512): the decode, the few-rows forward and input
// gradient. Contracts: csrc/nf4_cpu.h; the specification they must equal: csrc/nf4_cpu_scalar.cpp.
//
// A block's 16 values codebook[c] * scale (rounded through the activation dtype) sit in two 8-lane
// registers; codes are looked up with two 8-entry permutes (vpermps reads the low 3 bits of an
// index) and a blend on bit 3 of the code. The decode into memory takes 8 codes at a time in
// natural order (codes8, lookup16). The fused kernels take 32 at a time when K % 32 == 0
// (lookup32): one vpshufb puts each of 8 packed bytes in a lane twice (bits 0-7 and 24-31), so that
// the lane indexes the low nibble and selects on the high nibble's bit 3 as it is, and needs one
// shift for each of the other two; each group of 16 weights then comes out as its even elements,
// then its odd ones (kFusedOrder), the order in which the activations are staged once per call
// (stage_activations) and the input gradient is accumulated. Per 8 weights: 2 vpermps, 0.5
// vpshufb, 1 shift, 1 blend and the FMA with x. On a Zen 4 the permutes and shuffles share two
// pipes and the blend and the FMA two others, one pipe shared by both pairs: at least 1.83 cycles
// per 8 weights (docs/bench-nf4-cpu.md, "What bounds the decode").
// GCC's own intrinsic headers trip -Wmaybe-uninitialized (their _mm256_undefined_* helpers).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// round_bf16_bits (csrc/nf4_cpu.h) is inlined into the vector kernels; GCC warns that a vector
// argument of a function without the target would be passed in another way, which never happens.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "nf4_cpu.h"

#if MINIDORA_X86
#include <immintrin.h>

#include <cstring>

namespace minidora {
namespace avx2 {
namespace {

// ---- the block table and its lookups ------------------------------------------------------------

typedef uint32_t u32x8 __attribute__((vector_size(32)));

// The order of the weights of each 16-element group in the registers lookup32 fills: the even
// elements (high nibbles), then the odd ones.
constexpr int kFusedOrder[16] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};

// The 8 codes of elements e..e+7 (e % 8 == 0: 4 whole bytes), each in the low 4 bits of a lane,
// natural order: element i is bits 8*(i/2) + 4*(1 - i%2) of the little-endian word.
MD_TARGET_AVX2 __attribute__((always_inline)) inline __m256i codes8(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
}

// A 16-entry lookup with 8-entry permutes: both halves of the table, then a blend on bit 3.
MD_TARGET_AVX2 __attribute__((always_inline)) inline __m256 lookup16(__m256i idx, __m256 lo,
                                                                     __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// v rounded to bfloat16 (nearest even): its bits in the low 16 bits of each lane, or its value.
MD_TARGET_AVX2 inline __m256i bf16_bits(__m256 v) {
  return reinterpret_cast<__m256i>(round_bf16_bits(reinterpret_cast<u32x8>(v)) >> 16);
}
MD_TARGET_AVX2 inline __m256 bf16_value(__m256 v) {
  return reinterpret_cast<__m256>(round_bf16_bits(reinterpret_cast<u32x8>(v)) & 0xFFFF0000u);
}

// The block's table, codebook * scale, rounded through the activation dtype R, as two halves of 8.
template <Rounding R> MD_TARGET_AVX2 inline void block_table(float scale, __m256& lo, __m256& hi) {
  const __m256 s = _mm256_set1_ps(scale);
  lo = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook), s);
  hi = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook + 8), s);
  if constexpr (R == Rounding::kBFloat16) {
    lo = bf16_value(lo);
    hi = bf16_value(hi);
  } else if constexpr (R == Rounding::kFloat16) {
    alignas(32) float t[16];
    _mm256_store_ps(t, lo);
    _mm256_store_ps(t + 8, hi);
    for (float& v : t) v = round_through<c10::Half>(v);
    lo = _mm256_load_ps(t);
    hi = _mm256_load_ps(t + 8);
  }
}

// 32 elements (16 bytes at p, inside one block). Both halves of a register hold the 16 bytes; one
// vpshufb puts byte i of each 8 in lane i twice, at bits 0-7 and 24-31. vpermps reads bits 0-2 of a
// lane, the blend bit 31: the lane as it is indexes the low nibble and selects on bit 7 (the high
// nibble's bit 3); shifted right by 4 it indexes the high nibble; shifted left by 4 it selects on
// the low nibble's bit 3. f[2g] holds elements 16g + 2i (the high nibbles), f[2g + 1] elements
// 16g + 2i + 1 (kFusedOrder).
MD_TARGET_AVX2 __attribute__((always_inline)) inline void lookup32(const uint8_t* p, __m256 lo,
                                                                   __m256 hi, __m256 (&f)[4]) {
  const __m256i bytes =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  for (int g = 0; g < 2; ++g) {
    const char b = static_cast<char>(8 * g), z = static_cast<char>(0x80);
    const __m256i spread = _mm256_setr_epi8(
        b, z, z, b, b + 1, z, z, b + 1, b + 2, z, z, b + 2, b + 3, z, z, b + 3,  //
        b + 4, z, z, b + 4, b + 5, z, z, b + 5, b + 6, z, z, b + 6, b + 7, z, z, b + 7);
    const __m256i lane = _mm256_shuffle_epi8(bytes, spread);
    const __m256i high = _mm256_srli_epi32(lane, 4);
    f[2 * g] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, high),
                                _mm256_permutevar8x32_ps(hi, high), _mm256_castsi256_ps(lane));
    f[2 * g + 1] =
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, lane), _mm256_permutevar8x32_ps(hi, lane),
                         _mm256_castsi256_ps(_mm256_slli_epi32(lane, 4)));
  }
}

// STEP elements of one row of W from byte p, inside one block: 32 in kFusedOrder (lookup32), or 8
// in natural order.
template <int STEP>
MD_TARGET_AVX2 __attribute__((always_inline)) inline void lookup_step(const uint8_t* p, __m256 lo,
                                                                      __m256 hi,
                                                                      __m256 (&f)[STEP / 8]) {
  if constexpr (STEP == 32) {
    lookup32(p, lo, hi, f);
  } else {
    f[0] = lookup16(codes8(p), lo, hi);
  }
}

// ---- decode -------------------------------------------------------------------------------------

template <typename T> MD_TARGET_AVX2 inline void store8(__m256 v, T* out) {
  if constexpr (std::is_same<T, float>::value) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same<T, double>::value) {
    _mm256_storeu_pd(out, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(out + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __m256i r = bf16_bits(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int j = 0; j < 8; ++j) out[j] = static_cast<T>(t[j]);
  }
}

// The decode into memory: out[i] = T(value(e0 + i)) with the table rounded through R first
// (R = float32: the plain decode; T = float: decode_rounded).
template <typename T, Rounding R>
MD_TARGET_AVX2 void decode_as(const NF4View& w, int64_t e0, int64_t n, T* out) {
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(n, (8 - (e0 & 7)) & 7);
  for (; i < head; ++i) out[i] = static_cast<T>(round_to<R>(w.value(e0 + i)));
  int64_t current = -1;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {  // 8 elements from a multiple of 8: inside one block
    const int64_t e = e0 + i;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      block_table<R>(w.scale(block), lo, hi);
    }
    store8<T>(lookup16(codes8(w.packed + (e >> 1)), lo, hi), out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(round_to<R>(w.value(e0 + i)));
}

// decode_span and decode_rounded with the target of this level.
template <typename T>
MD_TARGET_AVX2 void decode_span_impl(const NF4View& w, int64_t e0, int64_t n, T* out) {
  decode_as<T, Rounding::kFloat32>(w, e0, n, out);
}

template <typename T>
MD_TARGET_AVX2 void decode_rounded_impl(const NF4View& w, int64_t e0, int64_t n, float* out) {
  decode_as<float, rounding_of<T>()>(w, e0, n, out);
}

// ---- few rows: forward --------------------------------------------------------------------------

MD_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

constexpr int64_t kScaleSpan = 64;  // blocks whose scales the kernels decode at once

// The scales of blocks [b0, b0 + n), as NF4View::scale gives them (bit-exact), 8 at a time: the
// dynamic map is read with a gather.
MD_TARGET_AVX2 void block_scales(const NF4View& w, int64_t b0, int64_t n, float* out) {
  int64_t i = 0;
  if (w.absmax == nullptr) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 offset = _mm256_set1_ps(w.offset);
    for (; i + 8 <= n; i += 8) {
      const int64_t b = b0 + i;
      const __m256i code =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.codes + b)));
      // 8 consecutive blocks span at most two nested blocks of 256
      const __m256i second = _mm256_cmpgt_epi32(
          _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(b % kNestedBlocksize)), lanes),
          _mm256_set1_epi32(static_cast<int>(kNestedBlocksize - 1)));
      const __m256 nested = _mm256_blendv_ps(_mm256_set1_ps(w.nested[b / kNestedBlocksize]),
                                             _mm256_set1_ps(w.nested[(b + 7) / kNestedBlocksize]),
                                             _mm256_castsi256_ps(second));
      __m256 p = _mm256_mul_ps(_mm256_i32gather_ps(w.dyn, code, 4), nested);
      __asm__("" : "+x"(p));  // rounded to float32 before the offset is added, as dq_scale
      _mm256_storeu_ps(out + i, _mm256_add_ps(p, offset));
    }
  }
  for (; i < n; ++i) out[i] = w.scale(b0 + i);
}

// One 32-element step at column k (K % 32 == 0) of NR rows of W, each looked up in its block's
// table, then the FMAs with MR rows of x (staged in kFusedOrder).
template <int MR, int NR, int NA>
MD_TARGET_AVX2 __attribute__((always_inline)) inline void forward_step(
    const uint8_t* const* rows, const __m256 (&lo)[NR], const __m256 (&hi)[NR], const float* xs,
    int64_t K, int64_t k, __m256 (&acc)[MR][NR][NA]) {
  if ((k & 127) == 0) prefetch_next_group<NR>(rows[0], K, k);
  for (int r = 0; r < NR; ++r) {
    __m256 f[4];
    lookup32(rows[r] + (k >> 1), lo[r], hi[r], f);
    for (int m = 0; m < MR; ++m)
      for (int q = 0; q < 4; ++q)
        acc[m][r][q % NA] =
            _mm256_fmadd_ps(_mm256_loadu_ps(xs + m * K + k + 8 * q), f[q], acc[m][r][q % NA]);
  }
}

template <int MR, int NR, int NA> MD_TARGET_AVX2 inline void zero(__m256 (&acc)[MR][NR][NA]) {
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < NA; ++a) acc[m][r][a] = _mm256_setzero_ps();
}

// Fused forward, K % 32 == 0: MR rows of x (float32, staged by stage_activations) times NR rows of
// W from o0 on. When the rows of W start on block boundaries (K % blocksize == 0) the scales of 64
// blocks of each row are decoded at once (block_scales), and no step checks its block.
template <int MR, int NR, Rounding R>
MD_TARGET_AVX2 void forward_block(const NF4View& w, const float* xs, int64_t K, int64_t o0,
                                  float* y, int64_t N) {
  constexpr int NA = 2;  // two FMA chains per row of x and of W
  __m256 acc[MR][NR][NA];
  zero(acc);
  const uint8_t* rows[NR];  // the packed bytes of each row
  for (int r = 0; r < NR; ++r) rows[r] = w.packed + (((o0 + r) * K) >> 1);
  const int64_t bs = int64_t{1} << w.shift;
  if (K % bs == 0) {
    const int64_t nb = K >> w.shift;
    float scales[NR][kScaleSpan];
    for (int64_t b0 = 0; b0 < nb; b0 += kScaleSpan) {
      const int64_t n = std::min(kScaleSpan, nb - b0);
      for (int r = 0; r < NR; ++r) block_scales(w, (o0 + r) * nb + b0, n, scales[r]);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t kb = (b0 + j) << w.shift;
        __m256 lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) block_table<R>(scales[r][j], lo[r], hi[r]);
        for (int64_t k = kb; k < kb + bs; k += 32)
          forward_step<MR, NR, NA>(rows, lo, hi, xs, K, k, acc);
      }
    }
  } else {  // blocks straddle rows: each row's block is checked at every step
    __m256 lo[NR], hi[NR];
    int64_t current[NR];
    for (int r = 0; r < NR; ++r) current[r] = -1;
    for (int64_t k = 0; k < K; k += 32) {
      for (int r = 0; r < NR; ++r) {
        const int64_t block = ((o0 + r) * K + k) >> w.shift;
        if (block != current[r]) {
          current[r] = block;
          block_table<R>(w.scale(block), lo[r], hi[r]);
        }
      }
      forward_step<MR, NR, NA>(rows, lo, hi, xs, K, k, acc);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      for (int a = 1; a < NA; ++a) acc[m][r][0] = _mm256_add_ps(acc[m][r][0], acc[m][r][a]);
      y[m * N + o0 + r] = hsum(acc[m][r][0]);
    }
}

// Fused forward, K % 8 == 0 but not 32: MR rows of x times row o of W, 8 elements a step in natural
// order (lookup16).
template <int MR, Rounding R> MD_TARGET_AVX2 void forward_natural(const NF4View& w, const float* xs,
                                                                  int64_t K, int64_t o, float* y,
                                                                  int64_t N) {
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t e0 = o * K;
  const uint8_t* row = w.packed + (e0 >> 1);
  int64_t current = -1;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    if ((k & 127) == 0) prefetch_next_group<1>(row, K, k);
    const int64_t block = (e0 + k) >> w.shift;
    if (block != current) {
      current = block;
      block_table<R>(w.scale(block), lo, hi);
    }
    const __m256 f = lookup16(codes8(row + (k >> 1)), lo, hi);
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + m * K + k), f, acc[m]);
  }
  for (int m = 0; m < MR; ++m) y[m * N + o] = hsum(acc[m]);
}

// Rows [n0, n1) of W times every row of x. K % 32 == 0: one row of x takes pairs of rows of W
// (independent chains of lookups, x loaded once for both), then a single row; more rows of x take
// one row of W at a time, in tiles of up to 4 rows of x (the row's packed bytes stay in L1 while
// the tiles read them).
template <Rounding R> void forward_tiles(const NF4View& w, const float* xs, int64_t M, int64_t N,
                                         int64_t K, int64_t n0, int64_t n1, float* y) {
  if (K % 32 != 0) {
    for (int64_t o = n0; o < n1; ++o)
      for_each_m_tile<4>(M, [&]<int MR>(int64_t m0) {
        forward_natural<MR, R>(w, xs + m0 * K, K, o, y + m0 * N, N);
      });
    return;
  }
  if (M == 1) {
    int64_t o = n0;
    for (; o + 2 <= n1; o += 2) forward_block<1, 2, R>(w, xs, K, o, y, N);
    for (; o < n1; ++o) forward_block<1, 1, R>(w, xs, K, o, y, N);
    return;
  }
  for (int64_t o = n0; o < n1; ++o)
    for_each_m_tile<4>(M, [&]<int MR>(int64_t m0) {
      forward_block<MR, 1, R>(w, xs + m0 * K, K, o, y + m0 * N, N);
    });
}

// ---- few rows: input gradient -------------------------------------------------------------------

// 32 sums in kFusedOrder (the even elements of each 16-group, then the odd ones) stored at out in
// natural order.
MD_TARGET_AVX2 inline void store_natural(const __m256 (&acc)[4], float* out) {
  for (int g = 0; g < 2; ++g) {
    const __m256 a = _mm256_unpacklo_ps(acc[2 * g], acc[2 * g + 1]);  // 0-3 | 8-11
    const __m256 b = _mm256_unpackhi_ps(acc[2 * g], acc[2 * g + 1]);  // 4-7 | 12-15
    _mm256_storeu_ps(out + 16 * g, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(out + 16 * g + 8, _mm256_permute2f128_ps(a, b, 0x31));
  }
}

// Fused input gradient: MR rows of gy times W[:, k0:k0 + STEP], summed over all N rows of W with
// the accumulators in registers (STEP as in forward_block), then stored in natural order.
template <int MR, int STEP, Rounding R>
MD_TARGET_AVX2 void grad_block(const NF4View& w, const float* gy, int64_t N, int64_t K, int64_t k0,
                               float* gx) {
  constexpr int NQ = STEP / 8;
  __m256 acc[MR][NQ];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm256_setzero_ps();
  int64_t current = -1;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t o = 0; o < N; ++o) {
    const int64_t e = o * K + k0;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      block_table<R>(w.scale(block), lo, hi);
    }
    __m256 f[NQ];
    lookup_step<STEP>(w.packed + (e >> 1), lo, hi, f);
    for (int m = 0; m < MR; ++m) {
      const __m256 g = _mm256_set1_ps(gy[m * N + o]);
      for (int q = 0; q < NQ; ++q) acc[m][q] = _mm256_fmadd_ps(g, f[q], acc[m][q]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if constexpr (STEP == 32) {
      store_natural(acc[m], gx + m * K + k0);
    } else {
      _mm256_storeu_ps(gx + m * K + k0, acc[m][0]);
    }
  }
}

// With more rows of gy, looking up each weight once per tile of rows would cost more than the
// FMAs: the 32 columns from k0 of kGradRows rows of W at a time are looked up once into a buffer
// in L1 (grad_lookup_rows), which every tile of rows of gy then reads (grad_from_buffer); the
// sums collect in gx in kFusedOrder and are put in natural order at the end (grad_finish).
constexpr int64_t kGradRows = 64;  // 8 KiB of float32

template <Rounding R> MD_TARGET_AVX2 void grad_lookup_rows(const NF4View& w, int64_t K, int64_t k0,
                                                           int64_t o0, int64_t n, float* buf) {
  int64_t current = -1;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t o = 0; o < n; ++o) {
    const int64_t e = (o0 + o) * K + k0;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      block_table<R>(w.scale(block), lo, hi);
    }
    __m256 f[4];
    lookup32(w.packed + (e >> 1), lo, hi, f);
    for (int q = 0; q < 4; ++q) _mm256_store_ps(buf + 32 * o + 8 * q, f[q]);
  }
}

// sums[m, 0:32] (row stride K) += gy[m, 0:n] (row stride N) @ buf[0:n, 0:32], for MR rows.
template <int MR> MD_TARGET_AVX2 void grad_from_buffer(const float* buf, int64_t n, const float* gy,
                                                       int64_t N, float* sums, int64_t K) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_loadu_ps(sums + m * K + 8 * q);
  for (int64_t o = 0; o < n; ++o) {
    __m256 f[4];
    for (int q = 0; q < 4; ++q) f[q] = _mm256_load_ps(buf + 32 * o + 8 * q);
    for (int m = 0; m < MR; ++m) {
      const __m256 g = _mm256_set1_ps(gy[m * N + o]);
      for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_fmadd_ps(g, f[q], acc[m][q]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(sums + m * K + 8 * q, acc[m][q]);
}

MD_TARGET_AVX2 void grad_finish(float* out) {
  __m256 acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_loadu_ps(out + 8 * q);
  store_natural(acc, out);
}

// gx[:, k0:k0 + 32] for all M rows of gy through the buffer (K % 32 == 0).
template <Rounding R> void grad_buffered(const NF4View& w, const float* gy, int64_t M, int64_t N,
                                         int64_t K, int64_t k0, float* gx) {
  alignas(32) float buf[kGradRows * 32];
  for (int64_t m = 0; m < M; ++m) std::fill(gx + m * K + k0, gx + m * K + k0 + 32, 0.f);
  for (int64_t o0 = 0; o0 < N; o0 += kGradRows) {
    const int64_t n = std::min(kGradRows, N - o0);
    grad_lookup_rows<R>(w, K, k0, o0, n, buf);
    for_each_m_tile<2>(M, [&]<int MR>(int64_t m0) {
      grad_from_buffer<MR>(buf, n, gy + m0 * N + o0, N, gx + m0 * K + k0, K);
    });
  }
  for (int64_t m = 0; m < M; ++m) grad_finish(gx + m * K + k0);
}

// Columns [k0, k1) in steps of STEP: up to 2 rows of gy straight from the lookups (grad_block),
// more through the buffer (grad_buffered) when K % 32 == 0.
template <int STEP, Rounding R> void grad_tiles(const NF4View& w, const float* gy, int64_t M,
                                                int64_t N, int64_t K, int64_t k0, int64_t k1,
                                                float* gx) {
  for (int64_t k = k0; k < k1; k += STEP) {
    if constexpr (STEP == 32) {
      if (M > 2) {
        grad_buffered<R>(w, gy, M, N, K, k, gx);
        continue;
      }
    }
    for_each_m_tile<2>(M, [&]<int MR>(int64_t m0) {
      grad_block<MR, STEP, R>(w, gy + m0 * N, N, K, k, gx + m0 * K);
    });
  }
}

}  // namespace

// ---- the entry points (csrc/nf4_cpu.h) ----------------------------------------------------------

template <typename T> void decode_span(const NF4View& w, int64_t e0, int64_t n, T* out) {
  decode_span_impl<T>(w, e0, n, out);
}

template <typename T> void decode_rounded(const NF4View& w, int64_t e0, int64_t n, float* out) {
  decode_rounded_impl<T>(w, e0, n, out);
}

// K % 32 == 0: each 16-group in kFusedOrder (lookup32); else natural order (lookup16).
template <typename T> void stage_activations(const T* x, int64_t M, int64_t K, float* out) {
  if (K % 32 != 0) {
    for (int64_t i = 0; i < M * K; ++i) out[i] = static_cast<float>(x[i]);
    return;
  }
  for (int64_t i = 0; i < M * K; i += 16)
    for (int j = 0; j < 16; ++j) out[i + j] = static_cast<float>(x[i + kFusedOrder[j]]);
}

template <typename T> void forward_rows(const NF4View& w, const float* xs, int64_t M, int64_t N,
                                        int64_t K, int64_t n0, int64_t n1, float* y) {
  forward_tiles<rounding_of<T>()>(w, xs, M, N, K, n0, n1, y);
}

// 32 columns a step when K % 32 == 0 (lookup32), else 8 (lookup16).
int64_t grad_unit(int64_t K) { return K % 32 == 0 ? 32 : kChunk; }

template <typename T> void grad_columns(const NF4View& w, const float* gy, int64_t M, int64_t N,
                                        int64_t K, int64_t k0, int64_t k1, float* gx) {
  if (K % 32 == 0) return grad_tiles<32, rounding_of<T>()>(w, gy, M, N, K, k0, k1, gx);
  grad_tiles<8, rounding_of<T>()>(w, gy, M, N, K, k0, k1, gx);
}

MD_INSTANTIATE_LEVEL_KERNELS

}  // namespace avx2
}  // namespace minidora

#endif  // MINIDORA_X86
