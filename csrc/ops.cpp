// The mmvmamba operator library: op schemas, shared argument checks and the
// Python module `mmvmamba._C` (importing it registers the ops).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "scan.h"

namespace mmvmamba {

namespace {

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
  const int64_t chunks = (shape.length + kChunk - 1) / kChunk;
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
}

// The torch version the library was compiled against; also kept as a plain
// string in the binary so that mmvmamba/ops/_ext.py can read it from a library
// that no longer loads.
extern "C" __attribute__((used)) const char mmvmamba_build_tag[] =
    "mmvmamba-built-with-torch=" TORCH_VERSION ";";

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled selective-scan kernels; importing registers torch.ops.mmvmamba.",
    -1, nullptr,
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
  if (PyModule_AddStringConstant(module, "__torch_version__", TORCH_VERSION) <
          0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
