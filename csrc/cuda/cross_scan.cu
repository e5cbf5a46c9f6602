// CUDA implementation of mmvmamba::cross_scan_fwd / _bwd: SS2D's fused
// four-direction scan of one channels-last map (cross_layout.cuh), float32,
// float16 and bfloat16. The host wrappers follow selective_scan.cu's pattern; N = 1
// may run on the kernels of cross_scan_n1.cu (use_n1 decides per pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../scan.h"
#include "cross_layout.cuh"
#include "cross_scan_n1.cuh"
#include "scan_launch.cuh"

namespace mmvmamba {
namespace scan_cuda {
namespace {

// The fused SS2D core: parameters of a (batch, L, D) map and its x_dbl.
ScanParams make_cross_params(const CrossShape& s, const at::Tensor& u,
                             const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                             const at::Tensor& dt_bias, const at::Tensor& A,
                             const at::Tensor& D) {
  // The kernels multiply positions by the bytes of a position in the maps
  // (4 D) and in x_dbl (4 x 4 (R + 2N)) as int32 x int32 -> int64
  // (cross_layout.cuh).
  TORCH_CHECK(s.d_inner <= INT32_MAX / 4 &&
                  kDirections * (s.rank + 2 * s.d_state) <= INT32_MAX / 4,
              "cross_scan (CUDA): D and 4 (R + 2N) must be below 2^29, got D = ",
              std::to_string(s.d_inner), ", R = ", std::to_string(s.rank));
  ScanParams p{};
  p.u = u.const_data_ptr();
  p.delta = x_dbl.const_data_ptr();
  p.A = A.const_data_ptr<float>();
  p.D = D.const_data_ptr<float>();
  p.delta_bias = dt_bias.const_data_ptr<float>();
  p.dt_weight = dt_weight.const_data_ptr<float>();
  p.batch = s.batch;
  p.groups = kDirections;
  p.per_group = s.d_inner;
  p.channels = kDirections * s.d_inner;
  p.length = s.height * s.width;
  p.d_state = s.d_state;
  p.chunks = ceil_div(p.length, kChunk);
  p.softplus = true;
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.rank = static_cast<int>(s.rank);
  p.row_stride = static_cast<int>(kDirections * (s.rank + 2 * s.d_state));
  p.dt_pitch = (p.rank + 3) / 4 * 4;  // rows of float4s (CrossIo)
  p.inv_height = 1.0f / static_cast<float>(s.height);
  for (int size = 2, i = 0; i < 2; size *= 2, ++i) {
    p.map_bytes[i] = static_cast<int>(s.d_inner) * size;
    p.row_bytes[i] = p.row_stride * size;
  }
  return p;
}

#define MMVMAMBA_DISPATCH_CROSS_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

FwdResult cross_scan_fwd_cuda(const at::Tensor& u_in, const at::Tensor& x_dbl_in,
                              const at::Tensor& dt_weight_in,
                              const at::Tensor& dt_bias_in, const at::Tensor& A_in,
                              const at::Tensor& D_in, int64_t height,
                              int64_t width) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous(), x_dbl = x_dbl_in.contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous();
  ScanParams p = make_cross_params(s, u, x_dbl, dt_weight, dt_bias, A, D);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor y = at::zeros(u.sizes(), f32);
  at::Tensor checkpoints =
      at::empty({s.batch, p.channels, p.chunks, s.d_state}, f32);
  if (u.numel() > 0) {
    p.y = y.mutable_data_ptr();
    p.checkpoints = checkpoints.mutable_data_ptr<float>();
    const bool n1 = use_n1(p, /*backward=*/false);
    MMVMAMBA_DISPATCH_CROSS_TYPES(u.scalar_type(), "cross_scan_fwd_cuda", [&] {
      if (n1) {
        launch_n1<scalar_t>(p, /*backward=*/false);
      } else {
        launch<CrossIo<scalar_t>>(p, /*backward=*/false, f32);
      }
    });
  }
  return {y, checkpoints};
}

CrossBwdResult cross_scan_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& x_dbl_in,
    const at::Tensor& dt_weight_in, const at::Tensor& dt_bias_in,
    const at::Tensor& A_in, const at::Tensor& D_in, int64_t height, int64_t width,
    const at::Tensor& checkpoints_in) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  check_cross_scan_grad_args(grad_in, u_in, checkpoints_in, s);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor dy = grad_in.contiguous(), u = u_in.contiguous(),
                   x_dbl = x_dbl_in.contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous(), checkpoints = checkpoints_in.contiguous();
  ScanParams p = make_cross_params(s, u, x_dbl, dt_weight, dt_bias, A, D);
  p.dy = dy.const_data_ptr();
  p.checkpoints = const_cast<float*>(checkpoints.const_data_ptr<float>());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::zeros(u.sizes(), f32);
  at::Tensor dx_dbl = at::zeros(x_dbl.sizes(), f32);
  at::Tensor ddt_weight = at::zeros(dt_weight.sizes(), f32);
  at::Tensor dA = at::zeros(A.sizes(), f32);
  at::Tensor dD = at::zeros(D.sizes(), f32);
  at::Tensor dbias = at::zeros(dt_bias.sizes(), f32);
  if (u.numel() > 0) {
    p.du = du.mutable_data_ptr();
    p.dx_dbl = dx_dbl.mutable_data_ptr<float>();
    p.ddt_weight = ddt_weight.mutable_data_ptr<float>();
    p.dA = dA.mutable_data_ptr<float>();
    p.dD = dD.mutable_data_ptr<float>();
    p.ddelta_bias = dbias.mutable_data_ptr<float>();
    const bool n1 = use_n1(p, /*backward=*/true);
    MMVMAMBA_DISPATCH_CROSS_TYPES(u.scalar_type(), "cross_scan_bwd_cuda", [&] {
      if (n1) {
        launch_n1<scalar_t>(p, /*backward=*/true);
      } else {
        launch<CrossIo<scalar_t>>(p, /*backward=*/true, f32);
      }
    });
  }
  return {du.to(u.scalar_type()), dx_dbl.to(u.scalar_type()), ddt_weight, dbias,
          dA, dD};
}

}  // namespace
}  // namespace scan_cuda
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CUDA, m) {
  m.impl("cross_scan_fwd", &mmvmamba::scan_cuda::cross_scan_fwd_cuda);
  m.impl("cross_scan_bwd", &mmvmamba::scan_cuda::cross_scan_bwd_cuda);
}
