// The NF4 format, once for the CPU and the CUDA code: the codebook, the block sizes and the scale
// of a double-quantized block. No torch header: nvcc compiles it into the device code too.
//
// Specification: minidora/nf4.py (docs/format.md). A weight of n elements, flattened row-major, is
// cut into blocks of `blocksize` elements, one scale each; element e has the 4-bit code
// packed[e / 2] >> 4 (e even) or packed[e / 2] & 0xF (e odd) and decodes to
//
//     w[e] = float32(codebook[code]) * float32(scale[e / blocksize])       (one float32 rounding)
//
// with scale[b] = absmax[b] (float32 scales), or, double-quantized (uint8 absmax),
//
//     scale[b] = float32(dynamic[absmax[b]] * nested_absmax[b / 256]) + offset   (dq_scale)
//
// rounded to float32 after the product and again after the sum, never fused into one FMA.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MD_HOST_DEVICE inline
#endif

// The 16 NF4 values (QLoRA, arXiv 2305.14314, sec. 3), float32, index = 4-bit code. A list, not an
// array, so that it initialises both the host array below and CUDA's __constant__ copy
// (csrc/cuda/nf4_kernels.cuh): device code cannot index a host array.
// clang-format off
#define MINIDORA_NF4_CODEBOOK                                                                 \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                  \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                 \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,    \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}
// clang-format on

namespace minidora {

constexpr float kNF4Codebook[16] = MINIDORA_NF4_CODEBOOK;

// blocksize: a power of two in this range. Every 32 consecutive elements from a multiple of 32 (16
// packed bytes, the chunk of the vector and CUDA kernels) then lie in one block and share a scale.
constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;

constexpr int kNestedShift = 8;                                   // log2(kNestedBlocksize)
constexpr int64_t kNestedBlocksize = int64_t{1} << kNestedShift;  // scales per nested_absmax value
constexpr int64_t kDynamicCodeSize = 256;  // entries of the 8-bit dynamic map

// The scale of a double-quantized block: float32(dyn * nested) + offset, dyn = dynamic[absmax[b]],
// nested = nested_absmax[b / 256]. The product must exist as a float32 value before the sum:
// __fmul_rn / __fadd_rn on the GPU, which nvcc never contracts into an FMA; on the CPU an empty asm
// that the compiler must assume reads the float32 product (a plain a * b + c may become an FMA).
MD_HOST_DEVICE float dq_scale(float dyn, float nested, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(dyn, nested), offset);
#else
  float p = dyn * nested;
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+x"(p));
#else
  volatile float vp = p;
  p = vp;
#endif
  return p + offset;
#endif
}

}  // namespace minidora
