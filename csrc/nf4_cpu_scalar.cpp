// Scalar kernels of the NF4 ops: plain loops over NF4View::value, one element at a time. They are
// the specification the AVX2 and AVX-512 kernels are tested against (the same results, bit for bit
// or to the float32 sums' tolerance) and the kernels of every CPU without those. Contracts:
// csrc/nf4_cpu.h; nf4_cpu.cpp calls them on one thread's share of the work.
//
// Specification: minidora/nf4.py (`dequantize`) and minidora/ops.py (F.linear(x, dequantize(W,
// x.dtype), bias)). An element decodes to float32(codebook[code]) * float32(scale) (NF4View::value,
// the formula of csrc/nf4_format.h), cast once to the output dtype; the matmuls round each weight
// to the activation dtype T, as the reference does, and multiply and add in float32, in order of k
// (forward) or of o (input gradient).
#include <algorithm>
#include <vector>

#include "nf4_cpu.h"

namespace minidora {
namespace scalar {

// ---- the entry points (csrc/nf4_cpu.h) ----------------------------------------------------------

template <typename T> void decode_span(const NF4View& w, int64_t e0, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w.value(e0 + i));
}

template <typename T> void decode_rounded(const NF4View& w, int64_t e0, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = round_through<T>(w.value(e0 + i));
}

// x as float32, in its natural order.
template <typename T> void stage_activations(const T* x, int64_t M, int64_t K, float* out) {
  for (int64_t i = 0; i < M * K; ++i) out[i] = static_cast<float>(x[i]);
}

// y[m, o] = sum_k xs[m, k] * T(W[o, k]) for o in [n0, n1): one row of W decoded, then M dot
// products.
template <typename T> void forward_rows(const NF4View& w, const float* xs, int64_t M, int64_t N,
                                        int64_t K, int64_t n0, int64_t n1, float* y) {
  std::vector<float> row(K);  // W[o, :], rounded through T
  for (int64_t o = n0; o < n1; ++o) {
    for (int64_t k = 0; k < K; ++k) row[k] = round_through<T>(w.value(o * K + k));
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xs + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * row[k];
      y[m * N + o] = acc;
    }
  }
}

int64_t grad_unit(int64_t) { return 1; }

// gx[m, k] = sum_o gy[m, o] * T(W[o, k]) for k in [k0, k1): each row of W adds its share in turn.
template <typename T> void grad_columns(const NF4View& w, const float* gy, int64_t M, int64_t N,
                                        int64_t K, int64_t k0, int64_t k1, float* gx) {
  for (int64_t m = 0; m < M; ++m) std::fill(gx + m * K + k0, gx + m * K + k1, 0.f);
  std::vector<float> row(k1 - k0);  // W[o, k0:k1], rounded through T
  for (int64_t o = 0; o < N; ++o) {
    for (int64_t k = k0; k < k1; ++k) row[k - k0] = round_through<T>(w.value(o * K + k));
    for (int64_t m = 0; m < M; ++m) {
      const float g = gy[m * N + o];
      float* gxm = gx + m * K;
      for (int64_t k = k0; k < k1; ++k) gxm[k] += g * row[k - k0];
    }
  }
}

MD_INSTANTIATE_LEVEL_KERNELS

}  // namespace scalar
}  // namespace minidora
