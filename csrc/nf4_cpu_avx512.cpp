// AVX-512 kernels of the NF4 ops: the decode, the few-rows forward and input gradient, and with
// AVX512_BF16 the few-rows forward for bfloat16 activations. Contracts: csrc/nf4_cpu.h; the
// specification they must equal: csrc/nf4_cpu_scalar.cpp.
//
// Every element of an absmax block uses the same scale, so a block decodes through a 16-entry
// table table[c] = codebook[c] * scale held in one register, and one vpermps (or vpermw for
// 16-bit tables) looks 16 (or 32) codes up in it at once.
// GCC's own intrinsic headers trip -W(maybe-)uninitialized (their _mm512_undefined_* helpers).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// round_bf16_bits (csrc/nf4_cpu.h) is inlined into the vector kernels; GCC warns that a vector
// argument of a function without the target would be passed in another way, which never happens.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "nf4_cpu.h"

#if MINIDORA_X86
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace minidora {
namespace avx512 {
namespace {

// ---- the block table and its lookups ------------------------------------------------------------

typedef uint32_t u32x16 __attribute__((vector_size(64)));

// The order in which the fused kernels see a 32-element chunk. The chunk's 16 bytes are
// broadcast to the four 128-bit lanes (a load, no shuffle); a per-lane variable shift then moves
// a different nibble into the low 4 bits of each 32-bit lane, which is all vpermps reads. Lane
// i = 4l + p of the first vector holds element 8p + l, of the second element 8p + 4 + l; the
// activations are stored in the same order once per call (stage_activations), so the inner loop
// needs two table lookups per 32 weights and no other shuffle.
constexpr int kFusedOrder[32] = {0, 8,  16, 24, 1, 9,  17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                                 4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};

// table[c] = codebook[c] * scale (float32 multiply, exactly the reference's value).
MD_TARGET_AVX512 inline __m512 scaled_codebook(float scale) {
  return _mm512_mul_ps(_mm512_loadu_ps(kNF4Codebook), _mm512_set1_ps(scale));
}

// v rounded to bfloat16 (nearest even): its bits in the low 16 bits of each lane, or its value.
MD_TARGET_AVX512 inline __m512i bf16_bits(__m512 v) {
  return reinterpret_cast<__m512i>(round_bf16_bits(reinterpret_cast<u32x16>(v)) >> 16);
}
MD_TARGET_AVX512 inline __m512 bf16_value(__m512 v) {
  return reinterpret_cast<__m512>(round_bf16_bits(reinterpret_cast<u32x16>(v)) & 0xFFFF0000u);
}

// The scaled table rounded to the activation dtype R.
template <Rounding R> MD_TARGET_AVX512 inline __m512 rounded_table(float scale) {
  const __m512 t = scaled_codebook(scale);
  if constexpr (R == Rounding::kBFloat16) return bf16_value(t);
  if constexpr (R == Rounding::kFloat16)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return t;
}

// 32 codes from 16 bytes as two vectors of 16 indices in natural order (elements 0..15, 16..31).
// vpermps only reads the low 4 bits of an index, so no masking is needed.
MD_TARGET_AVX512 inline void chunk_indices(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i high_nibbles = _mm_srli_epi16(bytes, 4);
  lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high_nibbles, bytes));
  hi = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high_nibbles, bytes));
}

MD_TARGET_AVX512 __attribute__((always_inline)) inline void fused_lookup(const uint8_t* p,
                                                                         __m512 table,
                                                                         __m512& first,
                                                                         __m512& second) {
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

MD_TARGET_AVX512 __attribute__((always_inline)) inline __m512i word_indices(const uint8_t* p) {
  const __m512i bytes =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i words = _mm512_shuffle_epi8(bytes, _mm512_load_si512(kWordIndexPattern.bytes));
  return _mm512_srlv_epi16(words, _mm512_set1_epi32(4));  // even words >> 4, odd words >> 0
}

template <typename T> MD_TARGET_AVX512 inline __m512i table16_of(__m512 table) {
  __m256i h;
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    h = _mm512_cvtepi32_epi16(bf16_bits(table));
  } else {
    h = _mm512_cvtps_ph(table, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// dyn[code] for 16 codes (0..255) from the 256-entry table in registers: vpermt2ps looks up 32
// entries at once, and bits 5, 6 and 7 of the code choose among the eight results.
MD_TARGET_AVX512 inline __m512 lookup256(const __m512 (&t)[16], __m512i code) {
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
MD_TARGET_AVX512 void block_scales(const NF4View& w, int64_t b0, int64_t n, float* out) {
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
      __asm__("" : "+v"(p));  // rounded to float32 before the offset is added, as dq_scale
      _mm512_storeu_ps(out + i, _mm512_add_ps(p, offset));
    }
  }
  for (; i < n; ++i) out[i] = w.scale(b0 + i);
}

// ---- decode -------------------------------------------------------------------------------------

// Decodes 32 elements starting at a multiple of 32 (so inside one block) into out.
template <typename T>
MD_TARGET_AVX512 inline void decode_chunk(const uint8_t* p, __m512 table, __m512i table16, T* out) {
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

// decode_span with the target of this level: out[i] = T(value(e0 + i)), 16-bit T through a table
// of T (vpermw).
template <typename T>
MD_TARGET_AVX512 void decode_span_impl(const NF4View& w, int64_t e0, int64_t n, T* out) {
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

// decode_rounded: the same into float32, with each block's table rounded through T.
template <typename T>
MD_TARGET_AVX512 void decode_rounded_impl(const NF4View& w, int64_t e0, int64_t n, float* out) {
  constexpr Rounding R = rounding_of<T>();
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(n, (32 - (e0 & 31)) & 31);
  for (; i < head; ++i) out[i] = round_to<R>(w.value(e0 + i));
  int64_t current = -1;
  __m512 table = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const int64_t e = e0 + i;
    const int64_t block = e >> w.shift;
    if (block != current) {
      current = block;
      table = rounded_table<R>(w.scale(block));
    }
    decode_chunk<float>(w.packed + (e >> 1), table, _mm512_setzero_si512(), out + i);
  }
  for (; i < n; ++i) out[i] = round_to<R>(w.value(e0 + i));
}

// ---- few rows: forward --------------------------------------------------------------------------

// One 32-element chunk at column k of NR rows: two lookups per row, then the FMAs.
template <int MR, int NR, int NA>
MD_TARGET_AVX512 __attribute__((always_inline)) inline void forward_chunk(
    const uint8_t* const* rows, const __m512* table, const float* xs, int64_t K, int64_t k,
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
template <int MR, int NR, Rounding R>
MD_TARGET_AVX512 void forward_block(const NF4View& w, const float* xs, int64_t K, int64_t o0,
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
        for (int r = 0; r < NR; ++r) table[r] = rounded_table<R>(scales[r][j]);
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
          table[r] = rounded_table<R>(w.scale(block));
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

// NR rows of W from o0 on, times every row of x, in tiles of up to 4 rows of x.
template <int NR, Rounding R> void forward_tiles(const NF4View& w, const float* xs, int64_t M,
                                                 int64_t K, int64_t o0, float* y, int64_t N) {
  for_each_m_tile<4>(M, [&]<int MR>(int64_t m0) {
    forward_block<MR, NR, R>(w, xs + m0 * K, K, o0, y + m0 * N, N);
  });
}

// ---- few rows: input gradient -------------------------------------------------------------------

// Fused input gradient for MR gradient rows and G 32-column chunks, summed over all N rows of
// W with the accumulators in registers. Chunk c of gx is accumulated in kFusedOrder.
template <int MR, int G, Rounding R>
MD_TARGET_AVX512 void grad_block(const NF4View& w, const float* gy, int64_t N, int64_t K,
                                 int64_t k0, float* gx) {
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
        table = rounded_table<R>(w.scale(block));
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

// G chunks of 32 columns from k0 on, for every row of gy, in tiles of up to 4 rows of gy.
template <int G, Rounding R> void grad_tiles(const NF4View& w, const float* gy, int64_t M,
                                             int64_t N, int64_t K, int64_t k0, float* gx) {
  for_each_m_tile<4>(
      M, [&]<int MR>(int64_t m0) { grad_block<MR, G, R>(w, gy + m0 * N, N, K, k0, gx + m0 * K); });
}

// ---- few rows, bfloat16 activations with AVX512_BF16: one vdpbf16ps per 32 weights ----------

// The fast layout (bf16_pair): blocks of at least 64 elements, rows of W a multiple of 64 long.
// Each 64-element piece of a row of x is then staged as its even elements, then its odd ones
// (kPairOrder): word i of the piece is element 2i, word 32 + i element 2i + 1.
inline bool bf16_pairs(const NF4View& w, int64_t K) { return w.shift >= 6 && K % 64 == 0; }

// One block's 16 values rounded to bfloat16, in words 0-15 and again in words 16-31 (vpermw reads
// 5 bits of each index, see word_indices). vcvtne2ps2bf16 rounds to nearest even like
// c10::BFloat16, but reads float32 subnormals as zero: values below 2^-126, which only blocks
// whose scale is below ~1.5e-37 have (the smallest nonzero |codebook| is 0.0796). vdpbf16ps
// reads such weights (and bfloat16 subnormals of x) as zero too, so for blocks of smaller scales
// the kernel's products are zero where the reference's are below 2^-126 (not yet handled).
MD_TARGET_AVX512BF16 inline __m512i bf16_table(float scale) {
  const __m512 t = scaled_codebook(scale);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(t, t));
}

// One 32-element chunk at column k of NR rows of W and MR rows of x (natural layout): one vpermw
// lookup per row of W on the indices of word_indices, one vdpbf16ps per pair of rows.
template <int MR, int NR>
MD_TARGET_AVX512BF16 __attribute__((always_inline)) inline void bf16_chunk(
    const uint8_t* const* rows, const __m512i* table, const uint16_t* x, int64_t K, int64_t k,
    __m512 (&acc)[MR][NR]) {
  __m512i wv[NR];
  if ((k & 127) == 0) prefetch_next_group<NR>(rows[0], K, k);
  for (int r = 0; r < NR; ++r)
    wv[r] = _mm512_permutexvar_epi16(word_indices(rows[r] + (k >> 1)), table[r]);
  for (int m = 0; m < MR; ++m) {
    const __m512i xv = _mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < NR; ++r)
      acc[m][r] = _mm512_dpbf16_ps(acc[m][r], reinterpret_cast<const __m512bh&>(xv),
                                   reinterpret_cast<const __m512bh&>(wv[r]));
  }
}

// Two chunks (64 elements, 32 bytes, inside one block) at column k, with x staged in kPairOrder:
// vpmovzxbw widens the 32 bytes to 32 words, byte j in word j. Its low nibble is element 2j + 1
// (vpermw also reads bit 4, hence the table twice), and the word shifted right by 4 is element 2j:
// two lookups per 64 weights and no other shuffle.
template <int MR, int NR> MD_TARGET_AVX512BF16 __attribute__((always_inline)) inline void bf16_pair(
    const uint8_t* const* rows, const __m512i* table, const uint16_t* x, int64_t K, int64_t k,
    __m512 (&acc)[MR][NR]) {
  __m512i even[NR], odd[NR];
  if ((k & 127) == 0) prefetch_next_group<NR>(rows[0], K, k);
  for (int r = 0; r < NR; ++r) {
    const __m512i bytes = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + (k >> 1))));
    even[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table[r]);
    odd[r] = _mm512_permutexvar_epi16(bytes, table[r]);
  }
  for (int m = 0; m < MR; ++m) {
    const __m512i x0 = _mm512_loadu_si512(x + m * K + k);       // elements k, k + 2, ..., k + 62
    const __m512i x1 = _mm512_loadu_si512(x + m * K + k + 32);  // elements k + 1, ..., k + 63
    for (int r = 0; r < NR; ++r) {
      acc[m][r] = _mm512_dpbf16_ps(acc[m][r], reinterpret_cast<const __m512bh&>(x0),
                                   reinterpret_cast<const __m512bh&>(even[r]));
      acc[m][r] = _mm512_dpbf16_ps(acc[m][r], reinterpret_cast<const __m512bh&>(x1),
                                   reinterpret_cast<const __m512bh&>(odd[r]));
    }
  }
}

template <int MR, int NR, bool PAIRS>
MD_TARGET_AVX512BF16 __attribute__((always_inline)) inline void bf16_step(
    const uint8_t* const* rows, const __m512i* table, const uint16_t* x, int64_t K, int64_t k,
    __m512 (&acc)[MR][NR]) {
  if constexpr (PAIRS) {
    bf16_pair<MR, NR>(rows, table, x, K, k, acc);
  } else {
    bf16_chunk<MR, NR>(rows, table, x, K, k, acc);
  }
}

// MR rows of bfloat16 x times NR rows of W: a vpermw lookup turns 32 codes into 32 weights, and
// vdpbf16ps multiplies them pairwise with x into float32. PAIRS (blocksize >= 64 and K % 64 == 0,
// x staged in kPairOrder): 64 elements at a time with bf16_pair, else 32 with bf16_chunk (x in its
// natural layout). When the rows of W start on block boundaries (K % blocksize == 0) the scales
// of 64 blocks of each row are decoded at once, as in forward_block.
template <int MR, int NR, bool PAIRS>
MD_TARGET_AVX512BF16 void forward_bf16_block(const NF4View& w, const uint16_t* x, int64_t K,
                                             int64_t o0, float* y, int64_t N) {
  constexpr int64_t kStep = PAIRS ? 64 : 32;
  __m512 acc[MR][NR];
  __m512i table[NR];
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = w.packed + (((o0 + r) * K) >> 1);
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  const int64_t bs = int64_t{1} << w.shift;
  if (K % bs == 0) {
    const int64_t nb = K >> w.shift;
    float scales[NR][kScaleSpan];
    for (int64_t b0 = 0; b0 < nb; b0 += kScaleSpan) {
      const int64_t n = std::min(kScaleSpan, nb - b0);
      for (int r = 0; r < NR; ++r) block_scales(w, (o0 + r) * nb + b0, n, scales[r]);
      for (int64_t j = 0; j < n; ++j) {
        for (int r = 0; r < NR; ++r) table[r] = bf16_table(scales[r][j]);
        const int64_t kb = (b0 + j) << w.shift;
        for (int64_t k = kb; k < kb + bs; k += kStep)
          bf16_step<MR, NR, PAIRS>(rows, table, x, K, k, acc);
      }
    }
  } else {
    int64_t current[NR];
    for (int r = 0; r < NR; ++r) current[r] = -1;
    for (int64_t k = 0; k < K; k += kStep) {
      for (int r = 0; r < NR; ++r) {
        const int64_t block = ((o0 + r) * K + k) >> w.shift;
        if (block != current[r]) {
          current[r] = block;
          table[r] = bf16_table(w.scale(block));
        }
      }
      bf16_step<MR, NR, PAIRS>(rows, table, x, K, k, acc);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + o0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// NR rows of W from o0 on, times every row of bfloat16 x, in tiles of up to MT rows of x.
template <int MT, int NR, bool PAIRS> void forward_bf16_tiles(const NF4View& w, const uint16_t* x,
                                                              int64_t M, int64_t K, int64_t o0,
                                                              float* y, int64_t N) {
  for_each_m_tile<MT>(M, [&]<int MR>(int64_t m0) {
    forward_bf16_block<MR, NR, PAIRS>(w, x + m0 * K, K, o0, y + m0 * N, N);
  });
}

// Rows of W in groups of NR, then one at a time, each times all of x in tiles of MT rows: MT * NR
// accumulators (at most 16 of the 32 registers), NR tables and NR decoded chunks.
template <int MT, int NR, bool PAIRS>
void forward_rows_bf16_tiled(const NF4View& w, const uint16_t* x, int64_t M, int64_t K, int64_t n0,
                             int64_t n1, float* y, int64_t N) {
  int64_t o = n0;
  for (; o + NR <= n1; o += NR) forward_bf16_tiles<MT, NR, PAIRS>(w, x, M, K, o, y, N);
  for (; o < n1; ++o) forward_bf16_tiles<MT, 1, PAIRS>(w, x, M, K, o, y, N);
}

// Rows of W at once, by the rows of x (MT * NR accumulators, at most 16 of the 32 registers):
// up to four rows of x, in one tile, with four rows of W (eight for one row of x in 32-element
// chunks); more rows of x, two rows of W in tiles of eight rows of x (one tile up to M = 8, so
// that each weight is decoded once). Measured on one Zen 4 core, 4096 x 4096, M = 1: four rows
// of W took 0.59 ms with bf16_pair, eight 0.72 ms.
template <bool PAIRS> void forward_rows_bf16_for(const NF4View& w, const uint16_t* x, int64_t M,
                                                 int64_t K, int64_t n0, int64_t n1, float* y,
                                                 int64_t N) {
  if (M == 1 && !PAIRS) return forward_rows_bf16_tiled<1, 8, PAIRS>(w, x, M, K, n0, n1, y, N);
  if (M <= 4) return forward_rows_bf16_tiled<4, 4, PAIRS>(w, x, M, K, n0, n1, y, N);
  forward_rows_bf16_tiled<8, 2, PAIRS>(w, x, M, K, n0, n1, y, N);
}

}  // namespace

// ---- the entry points (csrc/nf4_cpu.h) ----------------------------------------------------------

template <typename T> void decode_span(const NF4View& w, int64_t e0, int64_t n, T* out) {
  decode_span_impl<T>(w, e0, n, out);
}

template <typename T> void decode_rounded(const NF4View& w, int64_t e0, int64_t n, float* out) {
  decode_rounded_impl<T>(w, e0, n, out);
}

// Each 32-chunk in kFusedOrder.
template <typename T> void stage_activations(const T* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * K;
    float* om = out + m * K;
    for (int64_t k = 0; k < K; k += 32)
      for (int i = 0; i < 32; ++i) om[k + i] = static_cast<float>(xm[k + kFusedOrder[i]]);
  }
}

// Groups of four rows of W, then single rows.
template <typename T> void forward_rows(const NF4View& w, const float* xs, int64_t M, int64_t N,
                                        int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t o = n0;
  for (; o + 4 <= n1; o += 4) forward_tiles<4, rounding_of<T>()>(w, xs, M, K, o, y, N);
  for (; o < n1; ++o) forward_tiles<1, rounding_of<T>()>(w, xs, M, K, o, y, N);
}

int64_t grad_unit(int64_t) { return kChunk; }

// Groups of four chunks of 32 columns, then single chunks.
template <typename T> void grad_columns(const NF4View& w, const float* gy, int64_t M, int64_t N,
                                        int64_t K, int64_t k0, int64_t k1, float* gx) {
  constexpr int G = 4;
  int64_t k = k0;
  for (; k + 32 * G <= k1; k += 32 * G) grad_tiles<G, rounding_of<T>()>(w, gy, M, N, K, k, gx);
  for (; k < k1; k += 32) grad_tiles<1, rounding_of<T>()>(w, gy, M, N, K, k, gx);
}

void stage_bf16(const NF4View& w, const c10::BFloat16* x, int64_t M, int64_t K,
                c10::BFloat16* out) {
  if (!bf16_pairs(w, K)) return static_cast<void>(std::copy(x, x + M * K, out));
  for (int64_t i = 0; i < M * K; i += 64)
    for (int j = 0; j < 32; ++j) {
      out[i + j] = x[i + 2 * j];
      out[i + 32 + j] = x[i + 2 * j + 1];
    }
}

void forward_rows_bf16(const NF4View& w, const c10::BFloat16* x, int64_t M, int64_t N, int64_t K,
                       int64_t n0, int64_t n1, float* y) {
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  if (bf16_pairs(w, K)) return forward_rows_bf16_for<true>(w, xb, M, K, n0, n1, y, N);
  forward_rows_bf16_for<false>(w, xb, M, K, n0, n1, y, N);
}

MD_INSTANTIATE_LEVEL_KERNELS

}  // namespace avx512
}  // namespace minidora

#endif  // MINIDORA_X86
