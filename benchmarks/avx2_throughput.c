// Throughput of the instructions of the avx2 few-rows lookup (csrc/nf4_cpu_avx2.cpp, lookup32) on
// this CPU, alone and in pairs: how many of each the core starts per cycle, which tells which of
// them share execution ports. 12 independent chains, so latency does not limit; the clock comes
// from a chain of dependent scalar adds (one per cycle).
//
//   gcc -O2 -mavx2 -mfma benchmarks/avx2_throughput.c -o /tmp/avx2_throughput && /tmp/avx2_throughput
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define ROUNDS 30000000L
// Each operation feeds its result back into its chain; the empty asm keeps the compiler from
// folding or reordering the chains.
#define KEEP(a) __asm__("" : "+x"(a))
#define PERMPS(a) a = _mm256_castps_si256(_mm256_permutevar8x32_ps(_mm256_castsi256_ps(c), a)); KEEP(a)
#define PSHUFB(a) a = _mm256_shuffle_epi8(c, a); KEEP(a)
#define SHIFT(a) a = _mm256_srli_epi32(a, 1); KEEP(a)
#define BLENDV(a) a = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), \
                      _mm256_castsi256_ps(c), _mm256_castsi256_ps(a))); KEEP(a)
#define FMA(a) a = _mm256_castps_si256(_mm256_fmadd_ps(_mm256_castsi256_ps(a), \
                   _mm256_castsi256_ps(c), _mm256_castsi256_ps(a))); KEEP(a)
#define AND(a) a = _mm256_and_si256(a, c); KEEP(a)

// ns per pair of operations A, B, over 12 chains (6 of each), 4 times per round.
#define PAIR(A, B)                                                                       \
  {                                                                                      \
    __m256i a0 = _mm256_set1_epi32(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, \
            a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0, c = _mm256_set1_epi32(3);    \
    double t = now();                                                                    \
    for (long i = 0; i < ROUNDS; i++)                                                    \
      for (int u = 0; u < 4; u++) {                                                      \
        A(a0); B(a1); A(a2); B(a3); A(a4); B(a5); A(a6); B(a7); A(a8); B(a9); A(a10); B(a11); \
      }                                                                                  \
    t = (now() - t) / (24.0 * ROUNDS) * 1e9;                                             \
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));    \
    s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_add_epi32(a4, a5), _mm256_add_epi32(a6, a7))); \
    s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_add_epi32(a8, a9), _mm256_add_epi32(a10, a11))); \
    printf("%-7s + %-7s %6.3f ns = %5.2f cycles per pair   (%d)\n", #A, #B, t, t * ghz,    \
           _mm256_extract_epi32(s, 0));                                                  \
  }

int main(void) {
  long x = 1;
  double t = now();
  for (long i = 0; i < 1000000000L; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0" : "+r"(x));
  const double ghz = 2e9 / (now() - t) / 1e9;
  printf("clock about %.2f GHz (dependent adds, %ld)\n", ghz, x);
  PAIR(PERMPS, PERMPS) PAIR(PSHUFB, PSHUFB) PAIR(PERMPS, PSHUFB) PAIR(SHIFT, SHIFT)
  PAIR(PERMPS, SHIFT) PAIR(BLENDV, BLENDV) PAIR(FMA, FMA) PAIR(BLENDV, FMA)
  PAIR(PERMPS, BLENDV) PAIR(PERMPS, FMA) PAIR(AND, AND)
  return 0;
}
