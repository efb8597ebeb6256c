// Which kernel nf4_linear runs on a GPU: a pure function of the GPU's compute capability, the
// activation dtype and the minidora.ops.use(cuda_kernel=...) setting.
//
// Host code only (no CUDA headers): csrc/cuda/nf4_cuda.cu calls it with the device's capability,
// and csrc/ops.cpp exposes it to Python in every build, CPU-only included, as
// minidora._C.cuda_linear_path(major, minor, dtype, setting), so that tests can check every case
// with the capability mocked, without a GPU.
//
// The fused kernels by their numbers in nf4_kernels.cuh (linear 1 is the specification only):
//   float64                      "cublas": dequantize to float64, then cuBLAS (float64 sums)
//   float32                      "simt":   linear 2, linear_rows_kernel (CUDA cores)
//   bfloat16 / float16, sm_80+   "mma":    linear 3, linear_mma_kernel (tensor cores, mma.sync
//                                          m16n8k16), or "simt" with cuda_kernel="simt"
//   bfloat16 / float16, sm_70/75 "simt" (m16n8k16 with bf16/f16 inputs does not exist before
//                                          sm_80; cuda_kernel="mma" is an error naming the GPU)
// Each fused kernel covers small M only; larger or unaligned inputs dequantize, then call cuBLAS.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

#include "../nf4_common.h"

namespace minidora {

enum class CudaLinearPath : int {
  kMma = 0,    // linear 3 (linear_mma_kernel)
  kSimt = 1,   // linear 2 (linear_rows_kernel)
  kCublas = 2  // dequantize, then cuBLAS
};
constexpr const char* kCudaLinearPathNames[] = {"mma", "simt", "cublas"};

constexpr int kMmaMinMajor = 8;  // mma.sync m16n8k16 with bf16/f16 inputs: compute capability 8.0+

// The kernel of nf4_linear for activations of `dtype` on a GPU of compute capability
// major.minor, with the setting `kernel`. Throws (RuntimeError in Python) for cuda_kernel="mma"
// on a GPU without those tensor cores, naming its capability.
inline CudaLinearPath cuda_linear_path(int major, int minor, at::ScalarType dtype,
                                       CudaKernel kernel) {
  TORCH_CHECK_VALUE(major >= 0 && minor >= 0,
                    "cuda_linear_path: compute capability must be non-negative, got major = ",
                    major, ", minor = ", minor);
  TORCH_CHECK_VALUE(is_float_activation(dtype),
                    "cuda_linear_path: dtype must be float32, bfloat16, float16 or float64, got ",
                    dtype);
  if (dtype == at::kDouble) return CudaLinearPath::kCublas;
  if (dtype == at::kFloat) return CudaLinearPath::kSimt;  // the setting is for bf16 / fp16
  const bool tensor_cores = major >= kMmaMinMajor;
  if (kernel == CudaKernel::kSimt) return CudaLinearPath::kSimt;
  if (kernel == CudaKernel::kMma) {
    TORCH_CHECK(tensor_cores,
                "nf4_linear: cuda_kernel='mma' needs the bf16/fp16 tensor-core instruction "
                "mma.sync m16n8k16 of compute capability 8.0 or newer (sm_80+), but this GPU has "
                "compute capability ",
                major, ".", minor, " (sm_", major, minor,
                "); use cuda_kernel='auto' or 'simt' (CUDA cores)");
    return CudaLinearPath::kMma;
  }
  return tensor_cores ? CudaLinearPath::kMma : CudaLinearPath::kSimt;
}

// The same by names, for Python: dtype "float32" | "bfloat16" | "float16" | "float64", setting
// "auto" | "mma" | "simt"; returns "mma", "simt" or "cublas". Bad names throw ValueError.
inline std::string cuda_linear_path(int major, int minor, const std::string& dtype,
                                    const std::string& setting) {
  at::ScalarType t = at::kFloat;
  if (dtype == "float32") {
    t = at::kFloat;
  } else if (dtype == "bfloat16") {
    t = at::kBFloat16;
  } else if (dtype == "float16") {
    t = at::kHalf;
  } else if (dtype == "float64") {
    t = at::kDouble;
  } else {
    TORCH_CHECK_VALUE(false,
                      "cuda_linear_path: dtype must be 'float32', 'bfloat16', 'float16' or "
                      "'float64', got '",
                      dtype, "'");
  }
  CudaKernel k = CudaKernel::kAuto;
  if (setting == "mma") {
    k = CudaKernel::kMma;
  } else if (setting == "simt") {
    k = CudaKernel::kSimt;
  } else {
    TORCH_CHECK_VALUE(setting == "auto",
                      "cuda_linear_path: setting must be 'auto', 'mma' or 'simt', got '", setting,
                      "'");
  }
  return kCudaLinearPathNames[static_cast<int>(cuda_linear_path(major, minor, t, k))];
}

}  // namespace minidora
