// CPU kernels of the NF4 custom ops: the checks, the choice of regime and ISA level, and the
// threads and tiles. The kernels themselves are the ISA files' (contracts in csrc/nf4_cpu.h):
//
//   nf4_dequantize_cpu         decode_parallel: <level>::decode_span on every core
//   nf4_linear_cpu             M <= kMaxFusedRows: linear_fused (decode inside the dot products)
//                                avx512bf16, bfloat16 x, K % 32 == 0   avx512::forward_rows_bf16
//                                avx512, K % 32 == 0                   avx512::forward_rows
//                                avx2, K % 8 == 0                      avx2::forward_rows
//                                otherwise                             scalar::forward_rows
//                              more rows, or float64: linear_tiled (decoded tiles of W, BLAS)
//   nf4_linear_grad_input_cpu  M <= kMaxFusedRows: grad_fused, <level>::grad_columns (the same
//                              levels and conditions, without avx512bf16)
//                              more rows, or float64: grad_tiled (decoded tiles of W, BLAS)
//   decode_span                the decode of one thread at the chosen level
//   decode_rounded             the same, into float32 values rounded through T (the tiles of a
//                              16-bit dtype the level's BLAS does not multiply natively)
//
// The levels: csrc/nf4_cpu_scalar.cpp (the specification of the others, and any CPU),
// csrc/nf4_cpu_avx2.cpp, csrc/nf4_cpu_avx512.cpp; which levels the CPU has, and which one each
// thread asked for (minidora.ops.use(cpu_isa=...)), is csrc/cpu_isa.cpp. Tests run every level
// this CPU has.
//
// Specification: minidora/nf4.py (`dequantize`) and minidora/ops.py (the reference path
// F.linear(x, dequantize(W, x.dtype), bias)). Dequantized values are always
// float32(codebook[code]) * float32(scale), cast once to the output dtype: that makes
// nf4_dequantize bit-exact with the reference. Because every element of an absmax block uses the
// same scale, a block decodes through a 16-entry table table[c] = codebook[c] * scale.
//
// The matmul has two regimes:
//   * few rows (M <= kMaxFusedRows, decode-like): the 4-bit codes are decoded in registers inside
//     the dot products; the dense weight never exists in memory, so the kernel reads ~8x fewer
//     bytes than a float32 matmul;
//   * many rows: cache-sized tiles of W are decoded into the activation dtype and handed to the
//     BLAS behind at::mm / at::addmm, each thread decoding and multiplying its own tiles, so
//     decoding costs little next to the matmul and no full dense copy of W is allocated.
// In both, W is first rounded to the activation dtype (as the reference does) and products are
// accumulated in float32 (float64 for float64 activations).
//
// bfloat16 and float16 activations where the CPU has no arithmetic of that dtype (native_blas:
// bfloat16 only at the avx512bf16 level, float16 at none): BLAS would emulate the 16-bit matmul,
// 8x slower than float32 on an AVX2 CPU and far worse for float16. The many-rows regime then
// decodes tiles into float32 values rounded through the dtype (decode_rounded), converts x to
// float32 once, multiplies in float32 and rounds the result once: a bfloat16 matmul with float32
// accumulation, exactly what the few-rows kernels compute and within the reference's tolerance.
#include "nf4_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace minidora {
namespace {

constexpr int64_t kMaxFusedRows = 16;  // M up to this: fused decode-in-the-dot-product
// Dense tile of W in the many-rows regime, decoded and multiplied by one thread: a few times the
// 1 MiB L2, so that BLAS runs on wide enough matrices, while the tiles of all threads stay in the
// 32 MiB L3 (see linear_tiled).
constexpr int64_t kTileBytes = 2 << 20;

// ---- reading an NF4 weight ----------------------------------------------------------------------

// Keeps contiguous copies of the weight tensors alive while a kernel reads them.
struct NF4Operand {
  at::Tensor packed, absmax, nested, dyn;
  NF4View view;
};

NF4Operand make_operand(const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& offset, int64_t blocksize) {
  NF4Operand w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.view.packed = w.packed.data_ptr<uint8_t>();
  w.view.shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  if (w.absmax.scalar_type() == at::kFloat) {
    w.view.absmax = w.absmax.data_ptr<float>();
  } else {
    w.nested = nested_absmax->contiguous();
    w.dyn = nested_code->contiguous();
    w.view.codes = w.absmax.data_ptr<uint8_t>();
    w.view.nested = w.nested.data_ptr<float>();
    w.view.dyn = w.dyn.data_ptr<float>();
    w.view.offset = offset->item<float>();
  }
  return w;
}

// ---- the decode, at the chosen level ------------------------------------------------------------

template <typename T> void decode_span(Isa isa, const NF4View& w, int64_t e0, int64_t n, T* out) {
#if MINIDORA_X86
  if (isa >= Isa::kAvx512) return avx512::decode_span<T>(w, e0, n, out);
  if (isa >= Isa::kAvx2) return avx2::decode_span<T>(w, e0, n, out);
#endif
  scalar::decode_span<T>(w, e0, n, out);
}

template <typename T>
void decode_rounded(Isa isa, const NF4View& w, int64_t e0, int64_t n, float* out) {
#if MINIDORA_X86
  if (isa >= Isa::kAvx512) return avx512::decode_rounded<T>(w, e0, n, out);
  if (isa >= Isa::kAvx2) return avx2::decode_rounded<T>(w, e0, n, out);
#endif
  scalar::decode_rounded<T>(w, e0, n, out);
}

// Whether the BLAS behind at::mm multiplies T natively at this level (see the top of the file).
template <typename T> bool native_blas(Isa isa) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) return isa >= Isa::kAvx512Bf16;
  return !std::is_same<T, c10::Half>::value;
}

// Tiles for a BLAS on S: S == T, the weights in T; S == float (T 16-bit), rounded through T.
template <typename S, typename T>
void decode_tile(Isa isa, const NF4View& w, int64_t e0, int64_t n, S* out) {
  if constexpr (std::is_same<S, T>::value) {
    decode_span<T>(isa, w, e0, n, out);
  } else {
    decode_rounded<T>(isa, w, e0, n, out);
  }
}

// Decodes elements [e0, e0 + n) into out, in parallel over 32-element chunks.
template <typename T>
void decode_parallel(Isa isa, const NF4View& w, int64_t e0, int64_t n, T* out) {
  const int64_t chunks = (n + 31) / 32;
  at::parallel_for(0, chunks, 1024, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * 32, end = std::min(n, c1 * 32);
    decode_span<T>(isa, w, e0 + begin, end - begin, out + begin);
  });
}

// ---- few rows: the decode fused into the dot products -------------------------------------------

// The few-rows kernels of one level: forward_rows and grad_columns on float32 activations staged
// by stage_activations of the same level.
template <typename T> struct FusedKernels {
  void (*stage_activations)(const T*, int64_t, int64_t, float*);
  void (*forward_rows)(const NF4View&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                       float*);
  int64_t (*grad_unit)(int64_t);
  void (*grad_columns)(const NF4View&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                       float*);
};

// The best level of `isa` whose kernels take rows of K elements (K % kChunk == 0).
template <typename T> FusedKernels<T> fused_kernels(Isa isa, int64_t K) {
#if MINIDORA_X86
  if (isa >= Isa::kAvx512 && K % avx512::kChunk == 0)
    return {avx512::stage_activations<T>, avx512::forward_rows<T>, avx512::grad_unit,
            avx512::grad_columns<T>};
  if (isa >= Isa::kAvx2 && K % avx2::kChunk == 0)
    return {avx2::stage_activations<T>, avx2::forward_rows<T>, avx2::grad_unit,
            avx2::grad_columns<T>};
#endif
  return {scalar::stage_activations<T>, scalar::forward_rows<T>, scalar::grad_unit,
          scalar::grad_columns<T>};
}

// yf [M, N] = x @ W^T in float32, on the best kernel of `isa` for this case, 16 rows of W a task.
template <typename T> void forward_fused(Isa isa, const NF4View& w, const T* x, int64_t M,
                                         int64_t N, int64_t K, float* yf) {
#if MINIDORA_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (isa >= Isa::kAvx512Bf16 && K % avx512::kChunk == 0) {  // bfloat16 products
      std::vector<c10::BFloat16> xs(M * K);
      avx512::stage_bf16(w, x, M, K, xs.data());
      return at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        avx512::forward_rows_bf16(w, xs.data(), M, N, K, n0, n1, yf);
      });
    }
  }
#endif
  const FusedKernels<T> level = fused_kernels<T>(isa, K);
  std::vector<float> xs(M * K);
  level.stage_activations(x, M, K, xs.data());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    level.forward_rows(w, xs.data(), M, N, K, n0, n1, yf);
  });
}

// Few rows: y [M, N] in T, the bias added to the float32 sums before the one rounding to T.
template <typename T> at::Tensor linear_fused(Isa isa, const NF4View& w, const at::Tensor& x2d,
                                              const std::optional<at::Tensor>& bias, int64_t N,
                                              int64_t K) {
  const int64_t M = x2d.size(0);
  std::vector<float> yf(M * N);
  forward_fused<T>(isa, w, x2d.data_ptr<T>(), M, N, K, yf.data());
  at::Tensor y = at::empty({M, N}, x2d.options());
  T* out = y.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < N; ++o)
      out[m * N + o] = static_cast<T>(yf[m * N + o] + (b ? static_cast<float>(b[o]) : 0.f));
  return y;
}

// Few rows of grad_y: gx = gy @ W with the decode fused into the accumulation.
template <typename T>
at::Tensor grad_fused(Isa isa, const NF4View& w, const at::Tensor& gy2d, int64_t N, int64_t K) {
  const int64_t M = gy2d.size(0);
  const T* g = gy2d.data_ptr<T>();
  std::vector<float> gf(M * N);  // gy [M, N] in float32
  for (int64_t i = 0; i < M * N; ++i) gf[i] = static_cast<float>(g[i]);
  std::vector<float> gx(M * K);
  // grad_unit(K) columns per step of the kernel, 128 columns a task
  const FusedKernels<T> level = fused_kernels<T>(isa, K);
  const int64_t unit = level.grad_unit(K);
  at::parallel_for(0, K / unit, std::max<int64_t>(1, 128 / unit), [&](int64_t c0, int64_t c1) {
    level.grad_columns(w, gf.data(), M, N, K, c0 * unit, c1 * unit, gx.data());
  });
  at::Tensor out = at::empty({M, K}, gy2d.options());
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) o[i] = static_cast<T>(gx[i]);
  return out;
}

// ---- many rows: decoded tiles of W, multiplied by BLAS ------------------------------------------

// A 1-D scratch tensor of n elements, reused between calls of the same thread: a fresh
// multi-megabyte allocation would cost a page fault per 4 KiB on every call.
at::Tensor workspace(int64_t n, const at::TensorOptions& options) {
  thread_local at::Tensor bytes;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (!bytes.defined() || bytes.numel() < nbytes) bytes = at::empty({nbytes}, at::kByte);
  return at::from_blob(bytes.data_ptr(), {n}, options);
}

// Lines (rows or columns of W, `total` of them, `bytes_per_line` each once decoded) per tile: about
// kTileBytes, a multiple of `multiple`, and few enough that every thread gets two tiles.
int64_t tile_lines(int64_t total, int64_t bytes_per_line, int64_t multiple) {
  const int64_t fit = kTileBytes / bytes_per_line;
  const int64_t share = (total + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t lines = (std::min(fit, share) + multiple - 1) / multiple * multiple;
  return std::min(total, std::max(multiple, lines));
}

// Many rows: tiles of whole rows of W, y[:, tile] = x @ tile^T by BLAS. Each thread decodes its own
// tiles into its own buffer and multiplies them itself (BLAS called inside a parallel region runs
// on the calling thread): the tile never leaves the core that wrote it. When the threads shared
// one tile (one decode in parallel, then one multi-threaded BLAS call), decoding into the buffer
// that the previous product had just read was at times several times slower: each store first
// had to take its line back from the other core's cache (docs/bench-nf4-cpu.md).
// S: the dtype of the tiles and of x2d, T: the activation dtype the weights are rounded through.
template <typename S, typename T>
at::Tensor linear_tiled_on(Isa isa, const NF4View& w, const at::Tensor& x2d,
                           const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  const int64_t M = x2d.size(0);
  at::Tensor y = at::empty({M, N}, x2d.options());
  const int64_t rows = tile_lines(N, K * sizeof(S), 16);
  const at::ThreadLocalState
      state;  // the caller's dispatch state, for the BLAS calls of every thread
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard guard(state);
    at::Tensor buffer = workspace(rows * K, x2d.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, nt = std::min(rows, N - n0);
      decode_tile<S, T>(isa, w, n0 * K, nt * K, buffer.data_ptr<S>());
      const at::Tensor tile = buffer.narrow(0, 0, nt * K).view({nt, K});  // W[n0:n0+nt, :]
      at::Tensor out = y.narrow(1, n0, nt);
      if (bias.has_value()) {
        at::addmm_out(out, bias->narrow(0, n0, nt), x2d, tile.t());
      } else {
        at::mm_out(out, x2d, tile.t());
      }
    }
  });
  return y;
}

template <typename T> at::Tensor linear_tiled(Isa isa, const NF4View& w, const at::Tensor& x2d,
                                              const std::optional<at::Tensor>& bias, int64_t N,
                                              int64_t K) {
  if constexpr (sizeof(T) == 2) {
    if (!native_blas<T>(isa)) {  // float32 BLAS, one rounding of y to T at the end
      const std::optional<at::Tensor> b32 =
          bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
      return linear_tiled_on<float, T>(isa, w, x2d.to(at::kFloat), b32, N, K).to(x2d.scalar_type());
    }
  }
  return linear_tiled_on<T, T>(isa, w, x2d, bias, N, K);
}

// Asks for the packed bytes and the scale codes of elements [e, e + n) to be brought into the
// cache.
inline void prefetch_span(const NF4View& w, int64_t e, int64_t n) {
  const uint8_t* first = w.packed + (e >> 1);
  const uint8_t* last = w.packed + ((e + n - 1) >> 1);
  for (const uint8_t* p = first; p < last; p += 64) __builtin_prefetch(p);
  __builtin_prefetch(last);
  __builtin_prefetch(w.codes != nullptr ? static_cast<const void*>(w.codes + (e >> w.shift))
                                        : static_cast<const void*>(w.absmax + (e >> w.shift)));
}

// A column tile reads a short piece of every row of W, rows 2 KiB apart (for in = 4096), which
// the hardware prefetchers do not follow: the decode asks for the row kRowsAhead further on.
constexpr int64_t kRowsAhead = 4;

// Many rows, gx = gy @ W, with each thread owning its tiles as in linear_tiled.
// 16-bit tiles (S): column tiles W[:, k0:k0+kt], gx[:, k0:k0+kt] = gy @ tile, so that every element
// of gx is one complete sum accumulated in float32 by BLAS (no partial sums rounded to 16 bits).
// float32 / float64 tiles: row tiles W[n0:n0+nt, :], which read W in order; each thread adds
// gy[:, n0:n0+nt] @ tile into its own float32/float64 sum, and the sums are added at the end.
// S and T as in linear_tiled_on.
template <typename S, typename T>
at::Tensor grad_tiled_on(Isa isa, const NF4View& w, const at::Tensor& gy2d, int64_t N, int64_t K) {
  const int64_t M = gy2d.size(0);
  at::Tensor gx = at::empty({M, K}, gy2d.options());
  const at::ThreadLocalState state;  // as in linear_tiled
  if constexpr (sizeof(S) == 2) {
    const int64_t cols = tile_lines(K, N * sizeof(T), 128);  // whole 64-byte lines of each row
    at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor buffer = workspace(N * cols, gy2d.options());
      T* buf = buffer.data_ptr<T>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * cols, kt = std::min(cols, K - k0);
        for (int64_t o = 0; o < N; ++o) {
          if (o + kRowsAhead < N) prefetch_span(w, (o + kRowsAhead) * K + k0, kt);
          decode_span<T>(isa, w, o * K + k0, kt, buf + o * kt);
        }
        const at::Tensor tile = buffer.narrow(0, 0, N * kt).view({N, kt});  // W[:, k0:k0+kt]
        at::Tensor out = gx.narrow(1, k0, kt);
        at::mm_out(out, gy2d, tile);
      }
    });
  } else {
    const int64_t rows = tile_lines(N, K * sizeof(S), 16);
    std::vector<at::Tensor> sums(at::get_num_threads());  // one per thread that had tiles
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor buffer = workspace(rows * K, gy2d.options());
      at::Tensor sum = t0 == 0 ? gx : at::empty({M, K}, gy2d.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, nt = std::min(rows, N - n0);
        decode_tile<S, T>(isa, w, n0 * K, nt * K, buffer.data_ptr<S>());
        const at::Tensor tile = buffer.narrow(0, 0, nt * K).view({nt, K});  // W[n0:n0+nt, :]
        if (t == t0) {
          at::mm_out(sum, gy2d.narrow(1, n0, nt), tile);
        } else {
          sum.addmm_(gy2d.narrow(1, n0, nt), tile);
        }
      }
      if (t0 != 0) sums[at::get_thread_num()] = sum;
    });
    for (const at::Tensor& s : sums)
      if (s.defined()) gx.add_(s);
  }
  return gx;
}

template <typename T>
at::Tensor grad_tiled(Isa isa, const NF4View& w, const at::Tensor& gy2d, int64_t N, int64_t K) {
  if constexpr (sizeof(T) == 2) {
    if (!native_blas<T>(isa))  // float32 BLAS, one rounding of gx to T at the end
      return grad_tiled_on<float, T>(isa, w, gy2d.to(at::kFloat), N, K).to(gy2d.scalar_type());
  }
  return grad_tiled_on<T, T>(isa, w, gy2d, N, K);
}

// ---- the ops -----------------------------------------------------------------------------------

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& offset, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "nf4_dequantize";
  check_dequantize_dtype(op, dtype);
  const int64_t numel = shape_numel(op, shape);
  check_kernel_device(op, "CPU", at::kCPU, "packed", packed.device());
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   packed.device(), "packed");
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize", [&] {
    decode_parallel<scalar_t>(isa, w.view, 0, numel, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize,
                          int64_t out_features, int64_t in_features,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "nf4_linear";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t rows =
      check_activation(op, "x", x, in_features, "in_features", out_features, "out_features");
  check_kernel_device(op, "CPU", at::kCPU, "x", x.device());
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   x.device(), "x");
  check_bias(op, bias, x, out_features);
  const auto out_shape = with_last(x.sizes(), out_features);
  if (rows == 0) return at::empty(out_shape, x.options());
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const at::Tensor x2d = x.reshape({rows, in_features}).contiguous();  // [M, K]
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  const Isa isa = active_isa();
  const bool fused = x2d.size(0) <= kMaxFusedRows && x.scalar_type() != at::kDouble;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nf4_linear", [&] {
    y = fused ? linear_fused<scalar_t>(isa, w.view, x2d, b, out_features, in_features)
              : linear_tiled<scalar_t>(isa, w.view, x2d, b, out_features, in_features);
  });
  return y.view(out_shape);  // [..., N]
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed,
                                     const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t out_features, int64_t in_features) {
  const char* op = "nf4_linear_grad_input";
  const int64_t numel = check_features(op, out_features, in_features);
  const int64_t rows = check_activation(op, "grad_y", grad_y, out_features, "out_features",
                                        in_features, "in_features");
  check_kernel_device(op, "CPU", at::kCPU, "grad_y", grad_y.device());
  check_nf4_weight(op, packed, absmax, nested_absmax, nested_code, offset, blocksize, numel,
                   grad_y.device(), "grad_y");
  const auto out_shape = with_last(grad_y.sizes(), in_features);
  if (rows == 0) return at::empty(out_shape, grad_y.options());
  const at::Tensor gy2d = grad_y.reshape({rows, out_features}).contiguous();  // [M, N]
  const NF4Operand w = make_operand(packed, absmax, nested_absmax, nested_code, offset, blocksize);
  const Isa isa = active_isa();
  const bool fused = gy2d.size(0) <= kMaxFusedRows && grad_y.scalar_type() != at::kDouble;
  at::Tensor gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_y.scalar_type(), "nf4_linear_grad_input", [&] {
        gx = fused ? grad_fused<scalar_t>(isa, w.view, gy2d, out_features, in_features)
                   : grad_tiled<scalar_t>(isa, w.view, gy2d, out_features, in_features);
      });
  return gx.view(out_shape);  // [..., K]
}

}  // namespace

TORCH_LIBRARY_IMPL(minidora, CPU, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace minidora
