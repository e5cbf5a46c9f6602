// CUDA implementation of mmvmamba::selective_scan_fwd / _bwd: the plain
// selective scan on (batch, channels, L) rows (seq_layout.cuh), float32,
// float16 and bfloat16.
//
// Host wrappers (here and in cross_scan.cu) follow one pattern: check the
// arguments, make the inputs contiguous, fill ScanParams from them,
// allocate the outputs, and when there is anything to scan set the output
// pointers and launch the pass for the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../scan.h"
#include "scan_launch.cuh"
#include "seq_layout.cuh"

namespace mmvmamba {
namespace scan_cuda {
namespace {

// A pass of the plain scan: 4 lanes per channel up to N = 16, else 16.
template <typename T>
void launch_for_state(ScanParams& p, bool backward, const at::TensorOptions& f32) {
  if (p.d_state <= 16) {
    launch<SeqIo<T, 4>>(p, backward, f32);
  } else {
    launch<SeqIo<T, 16>>(p, backward, f32);
  }
}

ScanParams make_params(const ScanShape& s, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C,
                       const at::Tensor& D, const at::Tensor& delta_bias,
                       bool softplus) {
  ScanParams p{};
  p.u = u.const_data_ptr();
  p.delta = delta.const_data_ptr();
  p.B = B.const_data_ptr();
  p.C = C.const_data_ptr();
  p.A = A.const_data_ptr<float>();
  p.D = D.defined() ? D.const_data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.defined() ? delta_bias.const_data_ptr<float>() : nullptr;
  p.batch = s.batch;
  p.channels = s.channels;
  p.length = s.length;
  p.groups = s.groups;
  p.per_group = s.per_group;
  p.d_state = s.d_state;
  p.chunks = ceil_div(s.length, kChunk);
  p.softplus = softplus;
  return p;
}

FwdResult selective_scan_fwd_cuda(const at::Tensor& u_in,
                                  const at::Tensor& delta_in,
                                  const at::Tensor& A_in,
                                  const at::Tensor& B_in,
                                  const at::Tensor& C_in,
                                  const std::optional<at::Tensor>& D_in,
                                  const std::optional<at::Tensor>& bias_in,
                                  bool delta_softplus) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(),
                   A = A_in.contiguous(), B = B_in.contiguous(),
                   C = C_in.contiguous(), D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in);
  ScanParams p = make_params(s, u, delta, A, B, C, D, bias, delta_softplus);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor y = at::empty(u.sizes(), u.options());
  at::Tensor checkpoints =
      at::empty({s.batch, s.channels, p.chunks, s.d_state}, f32);
  if (u.numel() > 0) {
    p.y = y.mutable_data_ptr();
    p.checkpoints = checkpoints.mutable_data_ptr<float>();
    MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd_cuda", [&] {
      launch_for_state<scalar_t>(p, /*backward=*/false, f32);
    });
  }
  return {y, checkpoints};
}

BwdResult selective_scan_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in,
    const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& bias_in, bool delta_softplus,
    const at::Tensor& checkpoints_in) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CUDA);
  check_scan_grad_args(grad_in, u_in, checkpoints_in, s, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor dy = grad_in.contiguous(), u = u_in.contiguous(),
                   delta = delta_in.contiguous(), A = A_in.contiguous(),
                   B = B_in.contiguous(), C = C_in.contiguous(),
                   D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in),
                   checkpoints = checkpoints_in.contiguous();
  ScanParams p = make_params(s, u, delta, A, B, C, D, bias, delta_softplus);
  p.dy = dy.const_data_ptr();
  p.checkpoints = const_cast<float*>(checkpoints.const_data_ptr<float>());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(u.sizes(), u.options());
  at::Tensor dA = at::zeros(A.sizes(), f32);
  at::Tensor dB = at::zeros(B.sizes(), f32);
  at::Tensor dC = at::zeros(C.sizes(), f32);
  at::Tensor dD = at::zeros({s.channels}, f32);
  at::Tensor dbias = at::zeros({s.channels}, f32);
  if (u.numel() > 0) {
    p.du = du.mutable_data_ptr();
    p.ddelta = ddelta.mutable_data_ptr();
    p.dA = dA.mutable_data_ptr<float>();
    p.dB = dB.mutable_data_ptr<float>();
    p.dC = dC.mutable_data_ptr<float>();
    p.dD = dD.mutable_data_ptr<float>();
    p.ddelta_bias = dbias.mutable_data_ptr<float>();
    MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_bwd_cuda", [&] {
      launch_for_state<scalar_t>(p, /*backward=*/true, f32);
    });
  }
  return {du, ddelta, dA, dB.to(u.scalar_type()), dC.to(u.scalar_type()), dD,
          dbias};
}

}  // namespace
}  // namespace scan_cuda
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CUDA, m) {
  m.impl("selective_scan_fwd", &mmvmamba::scan_cuda::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &mmvmamba::scan_cuda::selective_scan_bwd_cuda);
}
