// Shared pieces of the NF4 kernels: the codebook and the argument checks.
//
// The format is described in shared/spec/nf4.md and implemented in plain PyTorch in
// minidora/nf4.py, which is the specification these kernels must equal. Every backend
// (csrc/*.cpp for the CPU, csrc/cuda/*.cu for CUDA) validates its arguments with the same
// `check_nf4_weight` so that a bad argument gets the same message everywhere.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace minidora {

// The 16 NF4 values (QLoRA, arXiv 2305.14314, sec. 3), float32, index = 4-bit code.
constexpr float kNF4Codebook[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int64_t kNestedBlocksize = 256;  // scales per double-quantization block

inline bool is_float_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Checks the tensors that describe one NF4 weight of `numel` elements and returns the number
// of absmax blocks. `op` names the calling op in the messages.
inline int64_t check_nf4_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code,
                                const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                int64_t numel) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in 32..4096, got ", blocksize);
  TORCH_CHECK(numel > 0, op, ": the weight must have at least one element, got ", numel);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be a uint8 tensor, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 1, op, ": packed must be 1-D [ceil(n/2)], got shape ", packed.sizes());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed must hold ceil(n/2) = ",
              (numel + 1) / 2, " bytes for a weight of n = ", numel, " elements, got ",
              packed.numel());
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const auto device = packed.device();
  TORCH_CHECK(absmax.device() == device, op, ": absmax must be on ", device, " like packed, got ",
              absmax.device());
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == n_blocks, op,
              ": absmax must be 1-D with ceil(n/blocksize) = ", n_blocks, " scales for n = ", numel,
              " and blocksize = ", blocksize, ", got shape ", absmax.sizes());
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK(!nested_absmax.has_value() && !nested_code.has_value() && !offset.has_value(), op,
                ": nested_absmax, nested_code and offset must be None when absmax is float32 "
                "(no double quantization)");
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, op,
                ": absmax must be float32 (plain scales) or uint8 (double-quantized codes), got ",
                absmax.scalar_type());
    TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value() && offset.has_value(), op,
                ": a uint8 absmax (double quantization) needs nested_absmax, nested_code and offset");
    const int64_t n_nested = (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->dim() == 1 &&
                    nested_absmax->numel() == n_nested,
                op, ": nested_absmax must be float32 1-D with ceil(n_blocks/256) = ", n_nested,
                " values for ", n_blocks, " blocks, got ", nested_absmax->scalar_type(), " of shape ",
                nested_absmax->sizes());
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->dim() == 1 &&
                    nested_code->numel() == 256,
                op, ": nested_code must be the float32 [256] dynamic map, got ",
                nested_code->scalar_type(), " of shape ", nested_code->sizes());
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, op,
                ": offset must be a float32 scalar tensor, got ", offset->scalar_type(),
                " of shape ", offset->sizes());
    TORCH_CHECK(nested_absmax->device() == device && nested_code->device() == device &&
                    offset->device() == device,
                op, ": nested_absmax, nested_code and offset must be on ", device, " like packed");
  }
  return n_blocks;
}

// Checks an activation-like tensor (x or grad_y) whose last dimension must be `features`.
inline void check_activation(const char* op, const char* name, const at::Tensor& t,
                             int64_t features, const char* features_name,
                             const at::Device& device) {
  TORCH_CHECK(is_float_activation(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == features, op, ": ", name,
              " must have last dimension ", features_name, " = ", features, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
              " like the packed weight, got ", t.device());
}

inline void check_features(const char* op, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(out_features > 0 && in_features > 0, op,
              ": out_features and in_features must be positive, got ", out_features, " and ",
              in_features);
}

}  // namespace minidora
