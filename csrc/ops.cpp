// The NF4 custom ops of minidora, declared once for every backend.
//
// Kernels: csrc/nf4_cpu.cpp (CPU) and csrc/cuda/ (CUDA) register implementations of exactly
// these schemas with TORCH_LIBRARY_IMPL. Fake (meta) implementations and autograd formulas are
// registered from Python in minidora/ops.py. The reference they must equal is minidora/nf4.py.
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cuda/nf4_select.h"  // host-only: the CUDA kernel choice, in every build
#include "nf4_common.h"

namespace minidora {
namespace {
std::atomic<int> g_cuda_kernel{static_cast<int>(CudaKernel::kAuto)};
constexpr const char* kCudaKernelNames[] = {"auto", "mma", "simt"};
}  // namespace

CudaKernel cuda_kernel() { return static_cast<CudaKernel>(g_cuda_kernel.load()); }

std::string cpu_isa();  // of the calling thread
std::string cpu_isa_best();
bool set_cpu_isa(const std::string& name);  // for the calling thread only
}  // namespace minidora

TORCH_LIBRARY(minidora, m) {
  // W [shape] decoded from NF4: float32(codebook[code]) * float32(scale), cast once to dtype.
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int[] shape, ScalarType dtype) -> Tensor");
  // y[..., out] = x[..., in] @ W^T + bias, in x's dtype.
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, int blocksize, int out_features, int in_features, "
      "Tensor? bias) -> Tensor");
  // grad_x[..., in] = grad_y[..., out] @ W (the 4-bit weight itself is frozen).
  m.def(
      "nf4_linear_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, int blocksize, int out_features, "
      "int in_features) -> Tensor");
}

// ---- the Python module minidora._C: importing it loads the ops above ----------------------------

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(minidora::cpu_isa().c_str());
}

PyObject* py_cpu_isa_best(PyObject*, PyObject*) {
  return PyUnicode_FromString(minidora::cpu_isa_best().c_str());
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: TypeError already set
  if (!minidora::set_cpu_isa(name)) {
    PyErr_Format(PyExc_ValueError,
                 "cpu isa must be 'auto', 'scalar', or where the CPU has them 'avx2', 'avx512' "
                 "or 'avx512bf16', got '%s'",
                 name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_cuda_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(
      minidora::kCudaKernelNames[static_cast<int>(minidora::cuda_kernel())]);
}

PyObject* py_set_cuda_kernel(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: TypeError already set
  for (int i = 0; i < 3; ++i) {
    if (std::string(name) == minidora::kCudaKernelNames[i]) {
      minidora::g_cuda_kernel.store(i);
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "cuda kernel must be 'auto', 'mma' or 'simt', got '%s'", name);
  return nullptr;
}

// cuda_linear_path(major, minor, dtype, setting) -> "mma" | "simt" | "cublas" (csrc/cuda/
// nf4_select.h): which kernel nf4_linear runs on a GPU of that compute capability.
PyObject* py_cuda_linear_path(PyObject*, PyObject* args) {
  int major = 0, minor = 0;
  const char* dtype = nullptr;
  const char* setting = nullptr;
  if (!PyArg_ParseTuple(args, "iiss", &major, &minor, &dtype, &setting)) return nullptr;
  try {
    return PyUnicode_FromString(minidora::cuda_linear_path(major, minor, dtype, setting).c_str());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
  return nullptr;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "Kernel set the CPU ops called from this thread use now: 'avx512bf16', 'avx512', 'avx2' or "
     "'scalar'."},
    {"cpu_isa_best", py_cpu_isa_best, METH_NOARGS, "Best kernel set this CPU supports."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Choose the CPU kernels of the ops called from this thread (other threads keep theirs): "
     "'auto' (best available), 'scalar', 'avx2', 'avx512' or 'avx512bf16'."},
    {"cuda_kernel", py_cuda_kernel, METH_NOARGS,
     "The CUDA linear kernel for bf16/fp16 activations now: 'auto', 'mma' or 'simt'."},
    {"set_cuda_kernel", py_set_cuda_kernel, METH_O,
     "Choose the CUDA linear kernel for bf16/fp16 activations, for the whole process: 'auto', "
     "'mma' (tensor cores) or 'simt' (CUDA cores)."},
    {"cuda_linear_path", py_cuda_linear_path, METH_VARARGS,
     "cuda_linear_path(major, minor, dtype, setting): the kernel nf4_linear runs for dtype "
     "('float32', 'bfloat16', 'float16', 'float64') on a GPU of compute capability major.minor "
     "with cuda_kernel=setting ('auto', 'mma', 'simt'): 'mma', 'simt' or 'cublas'."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "minidora's compiled NF4 ops, registered as torch.ops.minidora.*", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
