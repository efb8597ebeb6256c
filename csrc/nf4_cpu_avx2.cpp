// AVX2 kernels of the NF4 ops (CPUs without AVX-512): the decode and the few-rows forward.
// Contracts: csrc/nf4_cpu.h; the scalar specification they must equal: csrc/nf4_cpu.cpp.
//
// A block's 16 values codebook[c] * scale sit in two 8-lane registers; 8 codes are looked up with
// two 8-entry permutes and a blend on bit 3 of the code. Without AVX-512 the few-rows input
// gradient runs on the scalar loop.
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

typedef uint32_t u32x8 __attribute__((vector_size(32)));

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

MD_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Fused forward, MR rows of x (float32, natural layout) times NR rows of W; K % 8 == 0.
template <int MR, int NR, Rounding R>
MD_TARGET_AVX2 void forward_block(const NF4View& w, const float* xf, int64_t K, int64_t o0,
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
        block_table<R>(w.scale(block), lo[r], hi[r]);
      }
      wv[r] = lookup16(codes8(w.packed + (e >> 1)), lo[r], hi[r]);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(xf + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + o0 + r] = hsum(acc[m][r]);
}

}  // namespace

template <typename T>
MD_TARGET_AVX2 void decode_span(const NF4View& w, int64_t e0, int64_t n, T* out) {
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
      block_table<Rounding::kFloat32>(w.scale(block), lo, hi);
    }
    store8<T>(lookup16(codes8(w.packed + (e >> 1)), lo, hi), out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(w.value(e0 + i));
}

// Tiles of two rows of x times two rows of W; a last single row of x takes four rows of W.
template <typename T> void forward_rows(const NF4View& w, const float* x, int64_t M, int64_t N,
                                        int64_t K, int64_t n0, int64_t n1, float* y) {
  constexpr Rounding R = rounding_of<T>();
  for_each_m_tile<2>(M, [&]<int MR>(int64_t m0) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    constexpr int NR = MR == 1 ? 4 : 2;
    int64_t o = n0;
    for (; o + NR <= n1; o += NR) forward_block<MR, NR, R>(w, xm, K, o, ym, N);
    for (; o < n1; ++o) forward_block<MR, 1, R>(w, xm, K, o, ym, N);
  });
}

#define MD_INSTANTIATE(T)                                                                         \
  template void decode_span<T>(const NF4View&, int64_t, int64_t, T*);                             \
  template void forward_rows<T>(const NF4View&, const float*, int64_t, int64_t, int64_t, int64_t, \
                                int64_t, float*);
MD_INSTANTIATE(float)
MD_INSTANTIATE(double)
MD_INSTANTIATE(c10::BFloat16)
MD_INSTANTIATE(c10::Half)
#undef MD_INSTANTIATE

}  // namespace avx2
}  // namespace minidora

#endif  // MINIDORA_X86
