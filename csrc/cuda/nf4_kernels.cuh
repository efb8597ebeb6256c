// CUDA device code for the NF4 ops: decoding, dequantize, and the small-M fused matmuls.
//
// The format and the decode formula: csrc/nf4_format.h (specification: minidora/nf4.py).
// A weight W [N, K] is flattened row-major and cut into blocks of `blocksize` elements, one scale
// each; two 4-bit codes per byte, the first element in the HIGH nibble. An element decodes to
// float32(codebook[code]) * float32(scale), and a double-quantized scale is dq_scale
// (__fmul_rn / __fadd_rn on the GPU: never contracted into an FMA).
//
// The kernels of each op are numbered as in llm.c's dev/cuda: version 1 is the plain
// specification, each later version says what it adds. Host wrappers live in nf4_cuda.cu; which
// linear kernel runs is cuda_linear_path() in nf4_select.h.
//   dequantize 1   dequant_elem_kernel     one element per thread; any size and alignment.
//   dequantize 2   dequant_vec_kernel      + 32 elements per thread from one 16-byte load (one
//                                          block, one scale).
//   linear 1       linear_ref_kernel       y = x W^T + bias, one thread per element of y, each
//                                          weight decoded as dequantize 1 does; any M and K. The
//                                          ops never launch it: it is what 2 and 3 must equal.
//   linear 2       linear_rows_kernel      + M <= 16 on CUDA cores: one warp per output row,
//                                          16-byte loads of the packed row, each byte read once
//                                          and used for all M rows of x (float32 x; bf16 / fp16
//                                          before sm_80 or with ops.use(cuda_kernel="simt")).
//   linear 3       linear_mma_kernel       + M <= 64 on tensor cores for bf16 / fp16 (mma.sync
//                                          m16n8k16, sm_80+ only): a block owns 8 output rows,
//                                          each decoded weight serves up to 4 tiles of 16 rows of
//                                          x, 4 warps split K.
//   grad_input 1   grad_input_ref_kernel   grad_x = grad_y W, one thread per element of grad_x;
//                                          never launched by the ops, what 2 must equal.
//   grad_input 2   grad_input_kernel       + M <= 8: each thread owns 8 columns of W (one 4-byte
//                                          word per row), the rows are split over blocks; the
//                                          per-split partial sums are added in a fixed order by
//                                          sum_splits_kernel (deterministic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../nf4_format.h"

namespace minidora {
namespace cuda {

// The 16 NF4 values (csrc/nf4_format.h), copied into shared memory by each block (a per-element
// lookup from constant memory would serialise a warp whose lanes read different codes).
__constant__ float kCodebookDevice[16] = MINIDORA_NF4_CODEBOOK;

__device__ __forceinline__ void load_codebook(float* cb) {
  if (threadIdx.x < 16) cb[threadIdx.x] = kCodebookDevice[threadIdx.x];
  __syncthreads();
}

// Where the per-block scales live. Without double quantization only absmax_f is set.
struct Scales {
  const float* absmax_f;    // [n_blocks] float32 scales (no double quant)
  const uint8_t* absmax_q;  // [n_blocks] uint8 codes into `code` (double quant)
  const float* nested;      // [ceil(n_blocks / 256)] float32
  const float* code;        // [256] float32 dynamic map
  const float* offset;      // [1] float32, read on the device: no host synchronisation
};

// The float32 scale of block b (csrc/nf4_format.h).
template <bool DQ>
__device__ __forceinline__ float block_scale(const Scales& s, float offset, int64_t b) {
  if constexpr (DQ) {
    return dq_scale(__ldg(s.code + __ldg(s.absmax_q + b)), __ldg(s.nested + (b >> kNestedShift)),
                    offset);
  } else {
    return __ldg(s.absmax_f + b);
  }
}

template <bool DQ> __device__ __forceinline__ float load_offset(const Scales& s) {
  if constexpr (DQ) return __ldg(s.offset);
  return 0.0f;
}

// Element e of the weight, one at a time: float32(codebook[code]) * float32(scale).
template <bool DQ> __device__ __forceinline__ float decode1(const uint8_t* packed, const float* cb,
                                                            const Scales& s, float offset,
                                                            int bs_shift, int64_t e) {
  const uint32_t byte = packed[e >> 1];
  const uint32_t code = (e & 1) ? (byte & 0xFu) : (byte >> 4);
  return __fmul_rn(cb[code], block_scale<DQ>(s, offset, e >> bs_shift));
}

// --- element types: float <-> T conversions, round to nearest even as torch's .to(dtype) ------

template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};
template <> struct Elem<double> {
  static __device__ __forceinline__ double from_float(float v) { return static_cast<double>(v); }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ float round(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) {
    return __half2float(__float2half_rn(v));
  }
};

// Decodes one 32-bit word of packed codes (8 elements, little-endian bytes, high nibble first)
// into float32 values codebook[code] * scale.
__device__ __forceinline__ void decode8(uint32_t word, const float* cb, float scale, float* out) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = (word >> (8 * j)) & 0xFFu;
    out[2 * j] = __fmul_rn(cb[byte >> 4], scale);
    out[2 * j + 1] = __fmul_rn(cb[byte & 0xFu], scale);
  }
}

// Stores 8 float values as T at p (16-byte aligned for bf16/fp16, 32 for float, 64 for double).
__device__ __forceinline__ void store8(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(double* p, const float* v) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    reinterpret_cast<double2*>(p)[j] =
        make_double2(static_cast<double>(v[2 * j]), static_cast<double>(v[2 * j + 1]));
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
  uint4 r;
  __nv_bfloat162 h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  r.x = *reinterpret_cast<uint32_t*>(&h[0]);
  r.y = *reinterpret_cast<uint32_t*>(&h[1]);
  r.z = *reinterpret_cast<uint32_t*>(&h[2]);
  r.w = *reinterpret_cast<uint32_t*>(&h[3]);
  *reinterpret_cast<uint4*>(p) = r;
}
__device__ __forceinline__ void store8(__half* p, const float* v) {
  uint4 r;
  __half2 h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
  r.x = *reinterpret_cast<uint32_t*>(&h[0]);
  r.y = *reinterpret_cast<uint32_t*>(&h[1]);
  r.z = *reinterpret_cast<uint32_t*>(&h[2]);
  r.w = *reinterpret_cast<uint32_t*>(&h[3]);
  *reinterpret_cast<uint4*>(p) = r;
}

// Loads 8 consecutive activations as float32 (p aligned to 8 elements).
__device__ __forceinline__ void load8(const float* p, float* v) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = a.z;
  v[3] = a.w;
  v[4] = b.x;
  v[5] = b.y;
  v[6] = b.z;
  v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float* v) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}

// --- dequantize -----------------------------------------------------------------------------

// Dequantize kernel 1, the specification: out[i] for i in [start, n), one element per thread.
template <typename T, bool DQ>
__global__ void dequant_elem_kernel(const uint8_t* __restrict__ packed, Scales s, int bs_shift,
                                    int64_t start, int64_t n, T* __restrict__ out) {
  __shared__ float cb[16];
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = start + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = Elem<T>::from_float(decode1<DQ>(packed, cb, s, offset, bs_shift, i));
  }
}

// Dequantize kernel 2: chunk c = elements [32c, 32c + 32) from one 16-byte load; blocksize is a
// power of two >= kMinBlocksize = 32, so a chunk never straddles two blocks and needs one scale.
template <typename T, bool DQ>
__global__ void dequant_vec_kernel(const uint4* __restrict__ packed, Scales s, int bs_shift,
                                   int64_t n_chunks, T* __restrict__ out) {
  __shared__ float cb[16];
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_chunks;
       c += stride) {
    const uint4 v = __ldcs(packed + c);  // streamed: each byte is read once
    const float scale = block_scale<DQ>(s, offset, (c * 32) >> bs_shift);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float vals[8];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      decode8(words[w], cb, scale, vals);
      store8(out + c * 32 + w * 8, vals);
    }
  }
}

// --- linear: y = x W^T + bias ----------------------------------------------------------------

// Linear kernel 1, the specification: y[m, n] = T(sum_k x[m, k] * T(w[n, k]) + bias[n]), one
// thread per element i = m * N + n of y, the float32 sum in order of k; any M, K and alignment.
// Each weight is decoded to float32 and rounded to T, as the reference multiplies x by
// dequantize(W, T). Slow (every thread decodes a whole row of W): never launched by the ops.
template <typename T, bool DQ>
__global__ void linear_ref_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                  Scales s, int bs_shift, const T* __restrict__ bias,
                                  T* __restrict__ y, int M, int64_t N, int64_t K) {
  __shared__ float cb[16];
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float w = Elem<T>::round(decode1<DQ>(packed, cb, s, offset, bs_shift, n * K + k));
    acc = fmaf(Elem<T>::to_float(x[m * K + k]), w, acc);
  }
  y[i] = Elem<T>::from_float(acc + (bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.0f));
}

constexpr int kRowsWarps = 4;   // warps (= output rows) per block in linear_rows_kernel
constexpr int kRowsUnroll = 4;  // 16-byte loads in flight per lane

// Linear kernel 2 (CUDA cores): x [M, K], W [N, K] (K % 32 == 0, packed 16-byte aligned), y [M, N];
// M <= MT. Adds to kernel 1: one warp per row of W, whose lanes read it in 16-byte chunks (32
// weights, one scale), each weight decoded once and used for all M rows of x; float32 sums.
template <typename T, bool DQ, int MT> __global__ void __launch_bounds__(kRowsWarps * 32)
    linear_rows_kernel(const T* __restrict__ x, const uint4* __restrict__ packed, Scales s,
                       int bs_shift, const T* __restrict__ bias, T* __restrict__ y, int M,
                       int64_t N, int64_t K) {
  __shared__ float cb[16];
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t chunks = K >> 5;  // 16-byte chunks (32 weights) per row
  const uint4* row = packed + n * chunks;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kRowsUnroll) {
    uint4 v[kRowsUnroll];
    float scale[kRowsUnroll];
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u) {  // issue every load before any is used
      const int64_t c = c0 + 32 * u;
      if (c < chunks) {
        v[u] = __ldcs(row + c);
        scale[u] = block_scale<DQ>(s, offset, (n * K + c * 32) >> bs_shift);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      const uint32_t words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float wv[8];
        decode8(words[w], cb, scale[u], wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) wv[j] = Elem<T>::round(wv[j]);
        const int64_t k = c * 32 + w * 8;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv[8];
            load8(x + m * K + k, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(wv[j], xv[j], acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], d);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) y[m * N + n] = Elem<T>::from_float(acc[m] + b);
  }
}

// --- linear on tensor cores (bf16 / fp16) ------------------------------------------------------

// mma.sync m16n8k16 (sm_80+): C[16x8] += A[16x16] B[16x8], 16-bit inputs, float32 accumulation.
// pack() rounds two decoded float32 weights to T (round to nearest even, as dequantize does).
//
// The instruction does not exist with bf16 / f16 inputs before sm_80 (ptxas rejects it for V100's
// sm_70 and T4's sm_75), so device code compiled for those leaves it out: MINIDORA_MMA_M16N8K16
// is 0 there and linear_mma_kernel traps. The host never launches it on such a GPU:
// cuda_linear_path() (nf4_select.h) picks linear_rows_kernel from the device's capability.
// (__CUDA_ARCH__ is undefined in the host pass, which compiles no device code.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MINIDORA_MMA_M16N8K16 0
#else
#define MINIDORA_MMA_M16N8K16 1
#endif

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
#if MINIDORA_MMA_M16N8K16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
#if MINIDORA_MMA_M16N8K16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

constexpr int kMmaWarps = 4;   // warps per block; they split K and share 8 output rows
constexpr int kMmaUnroll = 4;  // 16-byte weight loads in flight per lane

// Linear kernel 3 (tensor cores): x [M, K] (M <= 16 * TILES), W [N, K] (K % 32 == 0, packed and x
// 16-byte aligned), y [M, N]. Adds to kernel 2: the products on tensor cores. A block owns output
// rows n0 .. n0+7. Lane (g = lane / 4, q = lane % 4) holds weight row n0 + g and, in each
// 128-column group, the 32 columns [32q, 32q + 32): one 16-byte load, 4 words, decoded once and
// used for all TILES tiles of 16 rows of x. The mma's k index is a sum index, so any order of the
// columns is fine as long as x (operand A) and W (operand B) use the same one: step (t, s) of a
// group takes columns 32q + 8t + 4s + r, r = 0..3, where the fragment layout wants k = 2q + r (r <
// 2) and 2q + 8 + r - 2 (r >= 2); then lane (g, q) needs x[g][32q + 8t + 4s + r] and x[g + 8][...],
// 8 contiguous bytes per row.
template <typename T, bool DQ, int TILES> __global__ void __launch_bounds__(kMmaWarps * 32)
    linear_mma_kernel(const T* __restrict__ x, const uint4* __restrict__ packed, Scales s,
                      int bs_shift, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N,
                      int64_t K) {
#if !MINIDORA_MMA_M16N8K16
  __trap();  // never launched below sm_80 (see above): fail loudly rather than return garbage
#else
  __shared__ float cb[16];
  __shared__ float red[kMmaWarps - 1][TILES][4][32];  // accumulators of warps 1.., by lane
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 8;
  const int64_t n = n0 + g;                  // weight row of this lane (column g of operand B)
  const int64_t chunks = K >> 5;             // 16-byte chunks per weight row
  const int64_t groups = (chunks + 3) >> 2;  // 128-column groups
  float c[TILES][4];
#pragma unroll
  for (int mt = 0; mt < TILES; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) c[mt][i] = 0.0f;

  for (int64_t G0 = warp; G0 < groups; G0 += kMmaWarps * kMmaUnroll) {
    uint4 v[kMmaUnroll];
    float scale[kMmaUnroll];
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {  // issue every weight load before any is used
      const int64_t chunk = (G0 + u * kMmaWarps) * 4 + q;
      v[u] = make_uint4(0u, 0u, 0u, 0u);
      scale[u] = 0.0f;
      if (n < N && chunk < chunks) {
        v[u] = __ldcs(packed + n * chunks + chunk);
        scale[u] = block_scale<DQ>(s, offset, (n * K + chunk * 32) >> bs_shift);
      }
    }
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int64_t chunk = (G0 + u * kMmaWarps) * 4 + q;
      if ((G0 + u * kMmaWarps) >= groups) break;  // the same for the whole warp
      const bool ok = chunk < chunks;             // a partial last group: zeros in A and B
      const uint32_t words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        float w[8];
        decode8(words[t], cb, scale[u], w);  // columns 32 chunk + 8t + 0..7 of row n
        // s = 0: columns 8t + 0..3; s = 1: columns 8t + 4..7.
        const uint32_t b0[2] = {Mma<T>::pack(w[0], w[1]), Mma<T>::pack(w[2], w[3])};
        const uint32_t b1[2] = {Mma<T>::pack(w[4], w[5]), Mma<T>::pack(w[6], w[7])};
        const int64_t k = chunk * 32 + 8 * t;
#pragma unroll
        for (int mt = 0; mt < TILES; ++mt) {
          const int m0 = 16 * mt + g, m1 = m0 + 8;  // rows of x in this lane's A fragment
          if (16 * mt >= M) break;                  // the same for the whole warp
          const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
          const uint4 xa =
              (ok && m0 < M) ? __ldg(reinterpret_cast<const uint4*>(x + m0 * K + k)) : zero;
          const uint4 xb =
              (ok && m1 < M) ? __ldg(reinterpret_cast<const uint4*>(x + m1 * K + k)) : zero;
          const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y};
          Mma<T>::mma(c[mt], a0, b0);
          const uint32_t a1[4] = {xa.z, xb.z, xa.w, xb.w};
          Mma<T>::mma(c[mt], a1, b1);
        }
      }
    }
  }
  // c[mt][0, 1]: y[16 mt + g][n0 + 2q + 0, 1]; c[mt][2, 3]: y[16 mt + g + 8][...]. Warps add
  // their sums in order (warp 0 + 1 + 2 + 3).
  if (warp > 0) {
#pragma unroll
    for (int mt = 0; mt < TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp - 1][mt][i][lane] = c[mt][i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int mt = 0; mt < TILES; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float sum = c[mt][i];
#pragma unroll
        for (int w = 0; w < kMmaWarps - 1; ++w) sum += red[w][mt][i][lane];
        const int m = 16 * mt + g + (i >= 2 ? 8 : 0);
        const int64_t nn = n0 + 2 * q + (i & 1);
        if (m < M && nn < N) {
          const float b = bias != nullptr ? Elem<T>::to_float(bias[nn]) : 0.0f;
          y[m * N + nn] = Elem<T>::from_float(sum + b);
        }
      }
    }
  }
#endif  // MINIDORA_MMA_M16N8K16
}

// --- grad_input: grad_x = grad_y W -------------------------------------------------------------

// Grad-input kernel 1, the specification: grad_x[m, k] = T(sum_n grad_y[m, n] * T(w[n, k])), one
// thread per element i = m * K + k of grad_x, the float32 sum in order of n; any M, K and
// alignment. Never launched by the ops.
template <typename T, bool DQ>
__global__ void grad_input_ref_kernel(const T* __restrict__ grad_y,
                                      const uint8_t* __restrict__ packed, Scales s, int bs_shift,
                                      T* __restrict__ grad_x, int M, int64_t N, int64_t K) {
  __shared__ float cb[16];
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * K) return;
  const int64_t m = i / K, k = i % K;
  float acc = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    const float w = Elem<T>::round(decode1<DQ>(packed, cb, s, offset, bs_shift, n * K + k));
    acc = fmaf(Elem<T>::to_float(grad_y[m * N + n]), w, acc);
  }
  grad_x[i] = Elem<T>::from_float(acc);
}

constexpr int kColsWarps = 4;          // warps per block; they take turns over the block's rows
constexpr int kColsUnroll = 4;         // rows in flight per lane
constexpr int kColsPerBlock = 32 * 8;  // a lane owns 8 columns (one 4-byte word per row)

// Grad-input kernel 2: grad_y [M, N], W [N, K] (K % 8 == 0, packed 4-byte aligned), M <= MT. Adds
// to kernel 1: a lane owns 8 columns, one 4-byte word of each row of W, decoded once for all M rows
// of grad_y; the rows [split * rows_per_split, ...) of W go to blockIdx.y = split, which writes its
// float32 sums to partial [split, M, K], added up by sum_splits_kernel.
template <typename T, bool DQ, int MT> __global__ void __launch_bounds__(kColsWarps * 32)
    grad_input_kernel(const T* __restrict__ grad_y, const uint32_t* __restrict__ packed, Scales s,
                      int bs_shift, float* __restrict__ partial, int M, int64_t N, int64_t K,
                      int64_t rows_per_split) {
  __shared__ float cb[16];
  __shared__ float red[kColsWarps - 1][MT][8][32];  // [warp - 1][m][j][lane]: no bank conflicts
  load_codebook(cb);
  const float offset = load_offset<DQ>(s);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + lane * 8;
  const bool active = k0 < K;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n_end = min(N, n_begin + rows_per_split);
  const int64_t words_per_row = K >> 3;
  float acc[MT][8];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.0f;

  if (active) {
    for (int64_t n0 = n_begin + warp; n0 < n_end; n0 += kColsWarps * kColsUnroll) {
      uint32_t v[kColsUnroll];
      float scale[kColsUnroll];
#pragma unroll
      for (int u = 0; u < kColsUnroll; ++u) {  // issue every load before any is used
        const int64_t n = n0 + u * kColsWarps;
        if (n < n_end) {
          v[u] = __ldcs(packed + n * words_per_row + (k0 >> 3));
          scale[u] = block_scale<DQ>(s, offset, (n * K + k0) >> bs_shift);
        }
      }
#pragma unroll
      for (int u = 0; u < kColsUnroll; ++u) {
        const int64_t n = n0 + u * kColsWarps;
        if (n >= n_end) break;
        float wv[8];
        decode8(v[u], cb, scale[u], wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) wv[j] = Elem<T>::round(wv[j]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            const float g = Elem<T>::to_float(grad_y[m * N + n]);  // same address in the warp
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][j] = fmaf(g, wv[j], acc[m][j]);
          }
        }
      }
    }
  }
  // Add the warps' sums in a fixed order (warp 0 + 1 + 2 + 3).
  if (warp > 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 8; ++j) red[warp - 1][m][j][lane] = acc[m][j];
  }
  __syncthreads();
  if (warp == 0 && active) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float sum[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          sum[j] = acc[m][j];
#pragma unroll
          for (int w = 0; w < kColsWarps - 1; ++w) sum[j] += red[w][m][j][lane];
        }
        store8(partial + (static_cast<int64_t>(blockIdx.y) * M + m) * K + k0, sum);
      }
    }
  }
}

// out[i] = T(sum over splits of partial[split, i]), splits added in order; i < count = M * K.
template <typename T> __global__ void sum_splits_kernel(const float* __restrict__ partial,
                                                        int64_t splits, int64_t count,
                                                        T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    float sum = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) sum += partial[sp * count + i];
    out[i] = Elem<T>::from_float(sum);
  }
}

}  // namespace cuda
}  // namespace minidora
