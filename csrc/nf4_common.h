// The argument checks of the NF4 ops, shared by every backend (the format itself, codebook
// included: csrc/nf4_format.h).
//
// The format is described in docs/format.md and implemented in plain PyTorch in
// minidora/nf4.py, which is the specification these kernels must equal. Every backend
// (csrc/*.cpp for the CPU, csrc/cuda/*.cu for CUDA) validates its arguments with the checks
// below, so that a bad argument gets the same message everywhere. They run once per call, before
// any kernel: every size an op receives as an int is checked against the tensors it describes,
// and every product of sizes against int64 overflow, so no kernel can index past a tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nf4_format.h"

namespace minidora {

// The CUDA linear kernel for bfloat16/float16 activations, chosen with minidora.ops.use(
// cuda_kernel=...): one setting for the process (CUDA's backward runs on autograd's own thread).
enum class CudaKernel : int { kAuto = 0, kMma = 1, kSimt = 2 };
CudaKernel cuda_kernel();  // defined in csrc/ops.cpp

inline bool is_float_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// a * b, or an error naming the product (`what`, e.g. "out_features * in_features").
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t product = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &product), op, ": ", what, " = ", a, " * ", b,
              " overflows int64");
  return product;
}

// Elements of a weight of `shape` (nf4_dequantize): positive sizes, product within int64.
inline int64_t shape_numel(const char* op, at::IntArrayRef shape) {
  int64_t numel = 1;
  for (const int64_t s : shape) {
    TORCH_CHECK(s > 0, op, ": shape must have positive sizes, got ", shape);
    TORCH_CHECK(!c10::mul_overflows(numel, s, &numel), op, ": shape ", shape,
                " has too many elements: the product of its sizes overflows int64");
  }
  return numel;
}

// Elements of a weight [out_features, in_features] (nf4_linear and its input gradient).
inline int64_t check_features(const char* op, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(out_features > 0, op, ": out_features must be positive, got ", out_features);
  TORCH_CHECK(in_features > 0, op, ": in_features must be positive, got ", in_features);
  return checked_mul(op, "out_features * in_features", out_features, in_features);
}

// `name` must live on `device`, the device of the tensor `device_name` (x, grad_y or packed).
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device, const char* device_name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", device_name,
              " is on ", device, "; every tensor of the call must be on one device");
}

// Checks the tensors that describe one NF4 weight of `numel` elements (from shape_numel or
// check_features), all on `device` (that of `device_name`), and returns the number of absmax
// blocks. `op` names the calling op in the messages.
inline int64_t check_nf4_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& offset, int64_t blocksize,
                                int64_t numel, const at::Device& device, const char* device_name) {
  TORCH_CHECK(blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize &&
                  (blocksize & (blocksize - 1)) == 0,
              op, ": blocksize must be a power of two in ", kMinBlocksize, "..", kMaxBlocksize,
              ", got ", blocksize);
  TORCH_CHECK(numel > 0, op, ": the weight must have at least one element, got ", numel);
  check_device(op, "packed", packed, device, device_name);
  check_device(op, "absmax", absmax, device, device_name);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be a uint8 tensor, got ",
              packed.scalar_type());
  const int64_t n_bytes = ceil_div(numel, 2);
  TORCH_CHECK(packed.dim() == 1, op, ": packed must be 1-D [ceil(n/2)] = [", n_bytes,
              "], got shape ", packed.sizes());
  TORCH_CHECK(packed.numel() == n_bytes, op, ": packed must hold ceil(n/2) = ", n_bytes,
              " bytes for a weight of n = ", numel, " elements, got ", packed.numel());
  const int64_t n_blocks = ceil_div(numel, blocksize);
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == n_blocks, op,
              ": absmax must be 1-D with ceil(n/blocksize) = ", n_blocks, " scales for n = ", numel,
              " and blocksize = ", blocksize, ", got shape ", absmax.sizes());
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK(!nested_absmax.has_value() && !nested_code.has_value() && !offset.has_value(), op,
                ": nested_absmax, nested_code and offset must be None when absmax is float32 "
                "(no double quantization)");
    return n_blocks;
  }
  TORCH_CHECK(absmax.scalar_type() == at::kByte, op,
              ": absmax must be float32 (plain scales) or uint8 (double-quantized codes), got ",
              absmax.scalar_type());
  TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value() && offset.has_value(), op,
              ": a uint8 absmax (double quantization) needs nested_absmax, nested_code and offset");
  check_device(op, "nested_absmax", *nested_absmax, device, device_name);
  check_device(op, "nested_code", *nested_code, device, device_name);
  check_device(op, "offset", *offset, device, device_name);
  const int64_t n_nested = ceil_div(n_blocks, kNestedBlocksize);
  TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->dim() == 1 &&
                  nested_absmax->numel() == n_nested,
              op, ": nested_absmax must be float32 1-D with ceil(n_blocks/256) = ", n_nested,
              " values for ", n_blocks, " blocks, got ", nested_absmax->scalar_type(), " of shape ",
              nested_absmax->sizes());
  TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->dim() == 1 &&
                  nested_code->numel() == kDynamicCodeSize,
              op, ": nested_code must be the float32 [256] dynamic map, got ",
              nested_code->scalar_type(), " of shape ", nested_code->sizes());
  TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->dim() <= 1 && offset->numel() == 1, op,
              ": offset must be a float32 tensor of one element (0-dim or [1]), got ",
              offset->scalar_type(), " of shape ", offset->sizes());
  return n_blocks;
}

// Checks an activation-like tensor (x or grad_y) [..., features] whose result is
// [..., result_features], and returns its number of rows (the product of the leading sizes).
inline int64_t check_activation(const char* op, const char* name, const at::Tensor& t,
                                int64_t features, const char* features_name,
                                int64_t result_features, const char* result_name) {
  TORCH_CHECK(is_float_activation(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == features, op, ": ", name, " must have last dimension ",
              features_name, " = ", features, ", got shape ", t.sizes());
  const int64_t rows = t.numel() / features;
  checked_mul(op, (std::string(name) + "'s rows * " + result_name).c_str(), rows,
              result_features);  // elements of the result
  return rows;
}

// bias: None, or [out_features] in x's dtype on x's device.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                       int64_t out_features) {
  if (!bias.has_value()) return;
  check_device(op, "bias", *bias, x.device(), "x");
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ",
              x.scalar_type(), ", got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op,
              ": bias must have shape [out_features] = [", out_features, "], got ", bias->sizes());
}

// The kernel of `backend` ("CPU", "CUDA") for device type `expected` got `name` on `device`: a
// direct call of the kernel (redispatch) with a tensor of another backend.
inline void check_kernel_device(const char* op, const char* backend, at::DeviceType expected,
                                const char* name, const at::Device& device) {
  TORCH_CHECK(device.type() == expected, op, ": the ", backend, " kernel got ", name, " on ",
              device);
}

// The dtype nf4_dequantize decodes into.
inline void check_dequantize_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(is_float_activation(dtype), op,
              ": dtype must be float32, bfloat16, float16 or float64, got ", dtype);
}

// `sizes` with the last one replaced by `last`: the shape of nf4_linear's result [..., out] and of
// its input gradient [..., in].
inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

}  // namespace minidora
