// The mmvmamba operator library: op schemas, shared argument checks and the
// Python module `mmvmamba._C` (importing it registers the ops).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "scan.h"
#include "segments.h"

namespace mmvmamba {

// Messages hold strings only: numbers are formatted with std::to_string, as
// streaming an integer into TORCH_CHECK's message crashed an extension built
// against torch 2.11 (libstdc++ mismatch). "(2, 3, 4)" for a tensor's sizes.
std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    out += (i ? ", " : "") + std::to_string(t.size(i));
  }
  return out + (t.dim() == 1 ? ",)" : ")");
}

namespace {

void check_float32_vector(const std::optional<at::Tensor>& t, const char* name,
                          const at::Tensor& u, int64_t channels) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == u.device(), "selective_scan: ", name,
              " is on ", t->device().str(), " but u is on ", u.device().str());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "selective_scan: ", name,
              " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "selective_scan: ",
              name, " must have shape (", std::to_string(channels), ",), got ",
              shape_str(*t));
}

}  // namespace

ScanShape check_scan_args(const at::Tensor& u, const at::Tensor& delta,
                          const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C,
                          const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& delta_bias,
                          c10::DeviceType device) {
  TORCH_CHECK(u.device().type() == device, "selective_scan: u is on ",
              u.device().str(), ", expected a ",
              c10::DeviceTypeName(device, /*lower_case=*/true), " tensor");
  for (const auto* t : {&delta, &A, &B, &C}) {
    TORCH_CHECK(t->device() == u.device(),
                "selective_scan: all tensors must be on one device, got ",
                t->device().str(), " and ", u.device().str());
  }
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "selective_scan: u must be float32, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(delta.scalar_type() == dtype && B.scalar_type() == dtype &&
                  C.scalar_type() == dtype,
              "selective_scan: delta, B and C must have u's dtype ", dtype,
              ", got ", delta.scalar_type(), ", ", B.scalar_type(), ", ",
              C.scalar_type());
  TORCH_CHECK(A.scalar_type() == at::kFloat,
              "selective_scan: A must be float32, got ", A.scalar_type());
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, channels, L), "
              "got shape ", shape_str(u));
  ScanShape s;
  s.batch = u.size(0);
  s.channels = u.size(1);
  s.length = u.size(2);
  TORCH_CHECK(delta.sizes().equals(u.sizes()), "selective_scan: delta must have "
              "u's shape ", shape_str(u), ", got ", shape_str(delta));
  TORCH_CHECK(A.dim() == 2 && A.size(0) == s.channels,
              "selective_scan: A must be (channels, N) with channels = ",
              std::to_string(s.channels), ", got ", shape_str(A));
  s.d_state = A.size(1);
  TORCH_CHECK(s.d_state >= 1 && s.d_state <= kMaxDState,
              "selective_scan: the kernel covers 1 <= N <= ",
              std::to_string(kMaxDState), ", got N = ",
              std::to_string(s.d_state));
  TORCH_CHECK(B.dim() == 4 && B.size(0) == s.batch && B.size(1) >= 1 &&
                  B.size(2) == s.d_state && B.size(3) == s.length,
              "selective_scan: B must be (batch, groups, N, L) = (",
              std::to_string(s.batch), ", G, ", std::to_string(s.d_state), ", ",
              std::to_string(s.length), "), got ", shape_str(B));
  s.groups = B.size(1);
  TORCH_CHECK(C.sizes().equals(B.sizes()), "selective_scan: C must have B's shape ",
              shape_str(B), ", got ", shape_str(C));
  TORCH_CHECK(s.channels % s.groups == 0, "selective_scan: ",
              std::to_string(s.groups), " groups do not divide ",
              std::to_string(s.channels), " channels");
  s.per_group = s.channels / s.groups;
  check_float32_vector(D, "D", u, s.channels);
  check_float32_vector(delta_bias, "delta_bias", u, s.channels);
  return s;
}

void check_scan_grad_args(const at::Tensor& grad_out, const at::Tensor& u,
                          const at::Tensor& checkpoints,
                          const ScanShape& shape, bool cuda) {
  TORCH_CHECK(grad_out.device() == u.device() &&
                  grad_out.scalar_type() == u.scalar_type() &&
                  grad_out.sizes().equals(u.sizes()),
              "selective_scan backward: grad_out must be like u (",
              u.scalar_type(), ", ", shape_str(u), ", ", u.device().str(),
              "), got ", grad_out.scalar_type(), ", ", shape_str(grad_out),
              ", ", grad_out.device().str());
  if (!cuda) return;
  const int64_t chunks = ceil_div(shape.length, kChunk);
  TORCH_CHECK(checkpoints.device() == u.device() &&
                  checkpoints.scalar_type() == at::kFloat &&
                  checkpoints.dim() == 4 &&
                  checkpoints.size(0) == shape.batch &&
                  checkpoints.size(1) == shape.channels &&
                  checkpoints.size(2) == chunks &&
                  checkpoints.size(3) == shape.d_state,
              "selective_scan backward: checkpoints must be the forward's "
              "float32 (batch, channels, chunks, N) tensor, got ",
              checkpoints.scalar_type(), " ", shape_str(checkpoints));
}

namespace {

void check_float32(const at::Tensor& t, const char* name, const at::Tensor& u,
                   std::initializer_list<int64_t> shape, const char* labels) {
  TORCH_CHECK(t.device() == u.device(), "cross_scan: ", name, " is on ",
              t.device().str(), " but u is on ", u.device().str());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "cross_scan: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "cross_scan: ", name, " must have shape ",
              labels, ", got ", shape_str(t));
}

}  // namespace

CrossShape check_cross_scan_args(const at::Tensor& u, const at::Tensor& x_dbl,
                                 const at::Tensor& dt_weight,
                                 const at::Tensor& dt_bias, const at::Tensor& A,
                                 const at::Tensor& D, int64_t height,
                                 int64_t width) {
  TORCH_CHECK(u.is_cuda() || u.is_cpu(), "cross_scan: u is on ",
              u.device().str(), ", expected a CPU or CUDA tensor");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kHalf ||
                  u.scalar_type() == at::kBFloat16,
              "cross_scan: u must be float32, float16 or bfloat16, got ",
              u.scalar_type());
  TORCH_CHECK(u.dim() == 3, "cross_scan: u must be (batch, H*W, D), got shape ",
              shape_str(u));
  TORCH_CHECK(u.size(1) < kMaxCrossLength,
              "cross_scan: the fused kernel covers H*W < 2^22, got ",
              std::to_string(u.size(1)));
  TORCH_CHECK(height >= 1 && width >= 1 && height * width == u.size(1),
              "cross_scan: height x width = ", std::to_string(height), " x ",
              std::to_string(width), " does not match u's length ",
              std::to_string(u.size(1)));
  CrossShape s;
  s.batch = u.size(0);
  s.height = height;
  s.width = width;
  s.d_inner = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == kDirections * s.d_inner,
              "cross_scan: A must be (4*D, N) = (", std::to_string(4 * s.d_inner),
              ", N), got ", shape_str(A));
  s.d_state = A.size(1);
  TORCH_CHECK(s.d_state >= 1 && s.d_state <= kMaxCrossDState,
              "cross_scan: the fused kernel covers 1 <= N <= ",
              std::to_string(kMaxCrossDState), ", got N = ",
              std::to_string(s.d_state));
  TORCH_CHECK(dt_weight.dim() == 3 && dt_weight.size(0) == kDirections &&
                  dt_weight.size(1) == s.d_inner && dt_weight.size(2) >= 1,
              "cross_scan: dt_weight must be (4, D, R) with D = ",
              std::to_string(s.d_inner), ", got ", shape_str(dt_weight));
  s.rank = dt_weight.size(2);
  check_float32(A, "A", u, {kDirections * s.d_inner, s.d_state}, "(4*D, N)");
  check_float32(dt_weight, "dt_weight", u, {kDirections, s.d_inner, s.rank},
                "(4, D, R)");
  check_float32(dt_bias, "dt_bias", u, {kDirections, s.d_inner}, "(4, D)");
  check_float32(D, "D", u, {kDirections * s.d_inner}, "(4*D,)");
  TORCH_CHECK(x_dbl.device() == u.device() && x_dbl.scalar_type() == u.scalar_type(),
              "cross_scan: x_dbl must be a ", u.scalar_type(), " tensor on ",
              u.device().str(), ", got ", x_dbl.scalar_type(), " on ",
              x_dbl.device().str());
  TORCH_CHECK(x_dbl.sizes().equals({s.batch, u.size(1), kDirections,
                                    s.rank + 2 * s.d_state}),
              "cross_scan: x_dbl must be (batch, H*W, 4, R + 2N) = (",
              std::to_string(s.batch), ", ", std::to_string(u.size(1)), ", 4, ",
              std::to_string(s.rank + 2 * s.d_state), "), got ", shape_str(x_dbl));
  return s;
}

void check_cross_scan_grad_args(const at::Tensor& grad_out, const at::Tensor& u,
                                const at::Tensor& checkpoints,
                                const CrossShape& shape) {
  TORCH_CHECK(grad_out.device() == u.device() &&
                  grad_out.scalar_type() == at::kFloat &&
                  grad_out.sizes().equals(u.sizes()),
              "cross_scan backward: grad_out must be float32 of u's shape ",
              shape_str(u), " on ", u.device().str(), ", got ",
              grad_out.scalar_type(), ", ", shape_str(grad_out));
  if (u.is_cpu()) {
    // The CPU forward keeps no checkpoints; its backward recomputes.
    TORCH_CHECK(checkpoints.numel() == 0, "cross_scan backward: the CPU "
                "kernel takes the forward's empty checkpoints, got shape ",
                shape_str(checkpoints));
    return;
  }
  const int64_t chunks = ceil_div(shape.height * shape.width, kChunk);
  TORCH_CHECK(checkpoints.device() == u.device() &&
                  checkpoints.scalar_type() == at::kFloat &&
                  checkpoints.sizes().equals({shape.batch,
                                              kDirections * shape.d_inner, chunks,
                                              shape.d_state}),
              "cross_scan backward: checkpoints must be the forward's float32 "
              "(batch, 4*D, chunks, N) tensor, got ",
              checkpoints.scalar_type(), " ", shape_str(checkpoints));
}

}  // namespace mmvmamba

TORCH_LIBRARY(mmvmamba, m) {
  // y and the state checkpoints the CUDA backward restarts from (an empty
  // tensor on the CPU, whose backward recomputes every state).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? delta_bias, bool delta_softplus) -> "
      "(Tensor out, Tensor checkpoints)");
  // Gradients w.r.t. u, delta, A, B, C, D and delta_bias; the last two are
  // float32 (channels,) even when D / delta_bias were not given.
  m.def(
      "selective_scan_bwd(Tensor grad_out, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, bool "
      "delta_softplus, Tensor checkpoints) -> (Tensor du, Tensor ddelta, "
      "Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor ddelta_bias)");
  // SS2D's four-direction scan of a channels-last map u (batch, H*W, D),
  // fused: x_dbl (batch, H*W, 4, R + 2N) holds each position's (dt_low, B,
  // C) per scan order; out is the merged float32 (batch, H*W, D);
  // checkpoints are the states the CUDA backward restarts from (empty on
  // the CPU, whose backward recomputes them).
  m.def(
      "cross_scan_fwd(Tensor u, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, "
      "Tensor A, Tensor D, int height, int width) -> (Tensor out, Tensor "
      "checkpoints)");
  m.def(
      "cross_scan_bwd(Tensor grad_out, Tensor u, Tensor x_dbl, Tensor "
      "dt_weight, Tensor dt_bias, Tensor A, Tensor D, int height, int width, "
      "Tensor checkpoints) -> (Tensor du, Tensor dx_dbl, Tensor ddt_weight, "
      "Tensor ddt_bias, Tensor dA, Tensor dD)");
}

// The torch version the library was compiled against; also kept as a plain
// string in the binary so that mmvmamba/ops/_ext.py can read it from a library
// that no longer loads.
extern "C" __attribute__((used)) const char mmvmamba_build_tag[] =
    "mmvmamba-built-with-torch=" TORCH_VERSION ";";

namespace {

// _C.segment_chunks(chunks, blocks, wave, backward, forced): the CUDA scans'
// segment rule (segments.h), for tests on any machine.
PyObject* py_segment_chunks(PyObject* /*module*/, PyObject* args) {
  long long chunks = 0, blocks = 0, wave = 0, forced = 0;
  int backward = 0;
  if (!PyArg_ParseTuple(args, "LLLpL", &chunks, &blocks, &wave, &backward,
                        &forced)) {
    return nullptr;
  }
  if (chunks < 1 || blocks < 1 || wave < 1 || forced < -1) {
    PyErr_Format(PyExc_ValueError,
                 "segment_chunks: need chunks, blocks and wave >= 1 and "
                 "forced >= -1, got chunks %lld, blocks %lld, wave %lld, "
                 "forced %lld", chunks, blocks, wave, forced);
    return nullptr;
  }
  return PyLong_FromLongLong(
      mmvmamba::segment_chunks(chunks, blocks, wave, backward != 0, forced));
}

PyMethodDef module_methods[] = {
    {"segment_chunks", py_segment_chunks, METH_VARARGS,
     "segment_chunks(chunks, blocks, wave, backward, forced) -> chunks per "
     "segment of the CUDA scans' pass (csrc/segments.h)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled selective-scan kernels; importing registers torch.ops.mmvmamba.",
    -1, module_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MMVMAMBA_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // The kernels' limits (scan.h), read by mmvmamba/ops/_ext.py.
  if (PyModule_AddStringConstant(module, "__torch_version__", TORCH_VERSION) <
          0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "max_d_state", mmvmamba::kMaxDState) <
          0 ||
      PyModule_AddIntConstant(module, "chunk", mmvmamba::kChunk) < 0 ||
      PyModule_AddIntConstant(module, "directions", mmvmamba::kDirections) <
          0 ||
      PyModule_AddIntConstant(module, "cross_max_d_state",
                              mmvmamba::kMaxCrossDState) < 0 ||
      PyModule_AddIntConstant(module, "cross_max_length",
                              mmvmamba::kMaxCrossLength) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
