// CUDA implementations of the minidora NF4 ops (schemas: TORCH_LIBRARY in csrc/ops.cpp). The
// kernels and their numbers: nf4_kernels.cuh.
//
//   nf4_dequantize          dequantize 2 (dequant_vec_kernel, 16-byte loads) + dequantize 1
//                           (dequant_elem_kernel) for the tail
//   nf4_linear              K % 32 == 0 and M <= 64: linear 3 (linear_mma_kernel; bf16 / fp16,
//                           tensor cores, sm_80+), M <= 16: linear 2 (linear_rows_kernel; float32,
//                           and bf16 / fp16 before sm_80 or with cuda_kernel="simt"; CUDA cores),
//                           fused 4-bit decode; otherwise dequantize to x's dtype, then at::linear
//                           (cuBLAS). The choice: cuda_linear_path() in nf4_select.h (a pure,
//                           tested function)
//   nf4_linear_grad_input   M <= 8 and K % 8 == 0: grad_input 2 (grad_input_kernel +
//                           sum_splits_kernel); otherwise dequantize to grad_y's dtype, then
//                           at::matmul (cuBLAS)
// float64 activations always take the dequantize + cuBLAS path (float64 accumulation). Linear 1 and
// grad_input 1, the specifications, are compiled (instantiated at the end of this file) but never
// launched. Nothing here synchronises with the host, so every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../nf4_common.h"
#include "nf4_kernels.cuh"
#include "nf4_select.h"

namespace minidora {
namespace {

using cuda::Scales;

constexpr int kThreads = 256;      // threads per block of the element-wise kernels
constexpr int64_t kMaxRowsM = 16;  // largest M of the fused CUDA-core linear kernel
constexpr int64_t kMaxMmaM = 64;   // largest M of the fused tensor-core linear kernel
constexpr int64_t kMaxColsM = 8;   // largest M of the fused grad-input kernel

// An NF4 weight as the kernels see it: checked, contiguous, on one CUDA device.
struct Weight {
  at::Tensor packed, absmax, nested, code, offset;
  bool dq = false;
  int bs_shift = 0;
  int64_t numel = 0;

  Scales scales() const {
    Scales s{};
    if (dq) {
      s.absmax_q = absmax.data_ptr<uint8_t>();
      s.nested = nested.data_ptr<float>();
      s.code = code.data_ptr<float>();
      s.offset = offset.data_ptr<float>();
    } else {
      s.absmax_f = absmax.data_ptr<float>();
    }
    return s;
  }
};

// `device_name` names the tensor whose device every weight tensor must share (x, grad_y, packed).
Weight make_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& nested_code,
                   const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t numel,
                   const at::Device& device, const char* device_name) {
  check_kernel_device(op, "CUDA", at::kCUDA, device_name, device);
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, device,
                   device_name);
  const c10::cuda::CUDAGuard guard(device);  // for the contiguous copies
  Weight w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.dq = absmax.scalar_type() == at::kByte;
  if (w.dq) {
    w.nested = nested_absmax->contiguous();
    w.code = nested_code->contiguous();
    w.offset = offset->contiguous();
  }
  w.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  w.numel = numel;
  return w;
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// A grid size, checked against the 2^31 - 1 blocks a launch can have in x.
unsigned grid_x(const char* kernel, int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= INT32_MAX, kernel, ": ", blocks,
              " thread blocks do not fit in one launch (at most 2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

int blocks_for(int64_t work, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, sms * 32)));
}

// Writes the dequantized weight into out (contiguous, numel elements, element type T).
template <typename T> void launch_dequantize(const Weight& w, T* out) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Scales s = w.scales();
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const bool vec = aligned(packed, 16) && aligned(out, 16);  // uint4 loads, 16-byte stores
  const int64_t n_chunks = vec ? w.numel / 32 : 0;
  if (n_chunks > 0) {
    const int grid = blocks_for(n_chunks, kThreads);
    const auto* p16 = reinterpret_cast<const uint4*>(packed);
    if (w.dq)
      cuda::dequant_vec_kernel<T, true>
          <<<grid, kThreads, 0, stream>>>(p16, s, w.bs_shift, n_chunks, out);
    else
      cuda::dequant_vec_kernel<T, false>
          <<<grid, kThreads, 0, stream>>>(p16, s, w.bs_shift, n_chunks, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t start = n_chunks * 32;
  if (start < w.numel) {
    const int grid = blocks_for(w.numel - start, kThreads);
    if (w.dq)
      cuda::dequant_elem_kernel<T, true>
          <<<grid, kThreads, 0, stream>>>(packed, s, w.bs_shift, start, w.numel, out);
    else
      cuda::dequant_elem_kernel<T, false>
          <<<grid, kThreads, 0, stream>>>(packed, s, w.bs_shift, start, w.numel, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The dense weight [N, K] in `dtype`, through launch_dequantize.
at::Tensor dequantize_to(const Weight& w, std::vector<int64_t> shape, at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, w.packed.options().dtype(dtype));
  switch (dtype) {
    case at::kFloat:
      launch_dequantize(w, out.data_ptr<float>());
      break;
    case at::kDouble:
      launch_dequantize(w, out.data_ptr<double>());
      break;
    case at::kBFloat16:
      launch_dequantize(w, reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()));
      break;
    case at::kHalf:
      launch_dequantize(w, reinterpret_cast<__half*>(out.data_ptr<at::Half>()));
      break;
    default:
      check_dequantize_dtype("nf4_dequantize", dtype);  // throws: dtype is none of the above
  }
  return out;
}

// --- nf4_dequantize -------------------------------------------------------------------------

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, int64_t blocksize,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "nf4_dequantize";
  check_dequantize_dtype(op, dtype);
  const int64_t numel = shape_numel(op, shape);
  const Weight w = make_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                               numel, packed.device(), "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  return dequantize_to(w, shape.vec(), dtype);
}

// --- nf4_linear -----------------------------------------------------------------------------

template <typename T, bool DQ, int MT>
void launch_rows(const Weight& w, const T* x, const T* bias, T* y, int M, int64_t N, int64_t K) {
  const int64_t grid = (N + cuda::kRowsWarps - 1) / cuda::kRowsWarps;
  cuda::linear_rows_kernel<T, DQ, MT><<<grid_x("linear_rows_kernel", grid), cuda::kRowsWarps * 32,
                                        0, at::cuda::getCurrentCUDAStream()>>>(
      x, reinterpret_cast<const uint4*>(w.packed.data_ptr<uint8_t>()), w.scales(), w.bs_shift, bias,
      y, M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DQ>
void dispatch_rows(const Weight& w, const T* x, const T* bias, T* y, int M, int64_t N, int64_t K) {
  if (M <= 1)
    launch_rows<T, DQ, 1>(w, x, bias, y, M, N, K);
  else if (M <= 2)
    launch_rows<T, DQ, 2>(w, x, bias, y, M, N, K);
  else if (M <= 4)
    launch_rows<T, DQ, 4>(w, x, bias, y, M, N, K);
  else if (M <= 8)
    launch_rows<T, DQ, 8>(w, x, bias, y, M, N, K);
  else
    launch_rows<T, DQ, 16>(w, x, bias, y, M, N, K);
}

template <typename T, bool DQ, int TILES>
void launch_mma(const Weight& w, const T* x, const T* bias, T* y, int M, int64_t N, int64_t K) {
  const int64_t grid = (N + 7) / 8;
  cuda::linear_mma_kernel<T, DQ, TILES><<<grid_x("linear_mma_kernel", grid), cuda::kMmaWarps * 32,
                                          0, at::cuda::getCurrentCUDAStream()>>>(
      x, reinterpret_cast<const uint4*>(w.packed.data_ptr<uint8_t>()), w.scales(), w.bs_shift, bias,
      y, M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DQ>
void dispatch_mma(const Weight& w, const T* x, const T* bias, T* y, int M, int64_t N, int64_t K) {
  if (M <= 16)
    launch_mma<T, DQ, 1>(w, x, bias, y, M, N, K);
  else if (M <= 32)
    launch_mma<T, DQ, 2>(w, x, bias, y, M, N, K);
  else
    launch_mma<T, DQ, 4>(w, x, bias, y, M, N, K);
}

// The kernel for activations of dtype dt on the current device: its compute capability and
// minidora.ops.use(cuda_kernel=...) decide (both kernels are validated by
// benchmarks/bench_nf4_cuda.py).
CudaLinearPath linear_path(at::ScalarType dt) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return cuda_linear_path(prop->major, prop->minor, dt, cuda_kernel());
}

template <typename T, typename AT>
void fused_linear(CudaLinearPath path, const Weight& w, const at::Tensor& x2,
                  const std::optional<at::Tensor>& bias, at::Tensor& y2) {
  const int M = static_cast<int>(x2.size(0));
  const int64_t K = x2.size(1), N = y2.size(1);
  const T* x = reinterpret_cast<const T*>(x2.data_ptr<AT>());
  const T* b = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr<AT>()) : nullptr;
  T* y = reinterpret_cast<T*>(y2.data_ptr<AT>());
  if constexpr (!std::is_same_v<T, float>) {
    if (path == CudaLinearPath::kMma) {
      if (w.dq)
        dispatch_mma<T, true>(w, x, b, y, M, N, K);
      else
        dispatch_mma<T, false>(w, x, b, y, M, N, K);
      return;
    }
  }
  if (w.dq)
    dispatch_rows<T, true>(w, x, b, y, M, N, K);
  else
    dispatch_rows<T, false>(w, x, b, y, M, N, K);
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize,
                           int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "nf4_linear";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t M =
      check_activation(op, "x", x, in_features, "in_features", out_features, "out_features");
  const Weight w = make_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                               numel, x.device(), "x");
  check_bias(op, bias, x, out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType dt = x.scalar_type();
  const CudaLinearPath path = linear_path(dt);  // before M == 0: a bad setting is always an error
  const std::vector<int64_t> out_shape = with_last(x.sizes(), out_features);
  if (M == 0) return at::empty(out_shape, x.options());

  const at::Tensor x2 = x.reshape({M, in_features}).contiguous();  // [M, K]
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const int64_t max_m = path == CudaLinearPath::kMma ? kMaxMmaM : kMaxRowsM;
  const bool fused = M <= max_m && path != CudaLinearPath::kCublas && in_features % 32 == 0 &&
                     aligned(w.packed.data_ptr(), 16) && aligned(x2.data_ptr(), 16);
  if (!fused) {
    const at::Tensor weight = dequantize_to(w, {out_features, in_features}, dt);  // [N, K]
    return at::linear(x2, weight, b).view(out_shape);
  }
  at::Tensor y2 = at::empty({M, out_features}, x.options());  // [M, N]
  switch (dt) {
    case at::kFloat:
      fused_linear<float, float>(path, w, x2, b, y2);
      break;
    case at::kBFloat16:
      fused_linear<__nv_bfloat16, at::BFloat16>(path, w, x2, b, y2);
      break;
    case at::kHalf:
      fused_linear<__half, at::Half>(path, w, x2, b, y2);
      break;
    default:
      TORCH_CHECK(false, op, ": unexpected dtype ", dt);
  }
  return y2.view(out_shape);
}

// --- nf4_linear_grad_input --------------------------------------------------------------------

template <typename T, bool DQ, int MT> void launch_cols(const Weight& w, const T* gy,
                                                        float* partial, int M, int64_t N, int64_t K,
                                                        int64_t splits, int64_t rows_per_split) {
  const dim3 grid(grid_x("grad_input_kernel", (K + cuda::kColsPerBlock - 1) / cuda::kColsPerBlock),
                  static_cast<unsigned>(splits));  // splits <= 4 * SMs
  cuda::grad_input_kernel<T, DQ, MT>
      <<<grid, cuda::kColsWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
          gy, reinterpret_cast<const uint32_t*>(w.packed.data_ptr<uint8_t>()), w.scales(),
          w.bs_shift, partial, M, N, K, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DQ> void dispatch_cols(const Weight& w, const T* gy, float* partial,
                                                  int M, int64_t N, int64_t K, int64_t splits,
                                                  int64_t rows_per_split) {
  if (M <= 1)
    launch_cols<T, DQ, 1>(w, gy, partial, M, N, K, splits, rows_per_split);
  else if (M <= 2)
    launch_cols<T, DQ, 2>(w, gy, partial, M, N, K, splits, rows_per_split);
  else if (M <= 4)
    launch_cols<T, DQ, 4>(w, gy, partial, M, N, K, splits, rows_per_split);
  else
    launch_cols<T, DQ, 8>(w, gy, partial, M, N, K, splits, rows_per_split);
}

template <typename T, typename AT>
void fused_grad_input(const Weight& w, const at::Tensor& gy2, at::Tensor& gx2) {
  const int M = static_cast<int>(gy2.size(0));
  const int64_t N = gy2.size(1), K = gx2.size(1);
  // Split the N rows so that about 4 blocks per SM are busy; each split costs M * K floats of
  // partial sums, written once and read once.
  const int64_t col_blocks = (K + cuda::kColsPerBlock - 1) / cuda::kColsPerBlock;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t step = cuda::kColsWarps * cuda::kColsUnroll;
  int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((4 * sms + col_blocks - 1) / col_blocks, (N + step - 1) / step));
  const int64_t rows_per_split = ((N + splits - 1) / splits + step - 1) / step * step;
  splits = (N + rows_per_split - 1) / rows_per_split;
  at::Tensor partial = at::empty({splits, M, K}, gy2.options().dtype(at::kFloat));
  const T* gy = reinterpret_cast<const T*>(gy2.data_ptr<AT>());
  if (w.dq)
    dispatch_cols<T, true>(w, gy, partial.data_ptr<float>(), M, N, K, splits, rows_per_split);
  else
    dispatch_cols<T, false>(w, gy, partial.data_ptr<float>(), M, N, K, splits, rows_per_split);
  const int64_t count = static_cast<int64_t>(M) * K;
  cuda::sum_splits_kernel<T>
      <<<blocks_for(count, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          partial.data_ptr<float>(), splits, count, reinterpret_cast<T*>(gx2.data_ptr<AT>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed,
                                      const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset, int64_t blocksize,
                                      int64_t out_features, int64_t in_features) {
  const char* op = "nf4_linear_grad_input";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t M = check_activation(op, "grad_y", grad_y, out_features, "out_features",
                                     in_features, "in_features");
  const Weight w = make_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                               numel, grad_y.device(), "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const std::vector<int64_t> out_shape = with_last(grad_y.sizes(), in_features);
  if (M == 0) return at::empty(out_shape, grad_y.options());

  const at::ScalarType dt = grad_y.scalar_type();
  const at::Tensor gy2 = grad_y.reshape({M, out_features}).contiguous();  // [M, N]
  const bool fused = M <= kMaxColsM && dt != at::kDouble && in_features % 8 == 0 &&
                     aligned(w.packed.data_ptr(), 4);
  if (!fused) {
    const at::Tensor weight = dequantize_to(w, {out_features, in_features}, dt);  // [N, K]
    return at::matmul(gy2, weight).view(out_shape);
  }
  at::Tensor gx2 = at::empty({M, in_features}, grad_y.options());  // [M, K]
  switch (dt) {
    case at::kFloat:
      fused_grad_input<float, float>(w, gy2, gx2);
      break;
    case at::kBFloat16:
      fused_grad_input<__nv_bfloat16, at::BFloat16>(w, gy2, gx2);
      break;
    case at::kHalf:
      fused_grad_input<__half, at::Half>(w, gy2, gx2);
      break;
    default:
      TORCH_CHECK(false, op, ": unexpected dtype ", dt);
  }
  return gx2.view(out_shape);
}

}  // namespace

// The specifications, linear 1 and grad_input 1, for every activation dtype of the fused kernels.
#define MD_INSTANTIATE_REFERENCE(T, DQ)                                                  \
  template __global__ void cuda::linear_ref_kernel<T, DQ>(                               \
      const T*, const uint8_t*, cuda::Scales, int, const T*, T*, int, int64_t, int64_t); \
  template __global__ void cuda::grad_input_ref_kernel<T, DQ>(                           \
      const T*, const uint8_t*, cuda::Scales, int, T*, int, int64_t, int64_t);
MD_INSTANTIATE_REFERENCE(float, false)
MD_INSTANTIATE_REFERENCE(float, true)
MD_INSTANTIATE_REFERENCE(__nv_bfloat16, false)
MD_INSTANTIATE_REFERENCE(__nv_bfloat16, true)
MD_INSTANTIATE_REFERENCE(__half, false)
MD_INSTANTIATE_REFERENCE(__half, true)
#undef MD_INSTANTIATE_REFERENCE

TORCH_LIBRARY_IMPL(minidora, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace minidora
