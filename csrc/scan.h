// Shared declarations of the selective-scan ops: shapes, argument checks and
// the per-device implementations registered in ops.cpp / csrc/cuda/*.cu.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace mmvmamba {

// Largest state size N the kernels cover.
constexpr int64_t kMaxDState = 64;
// The CUDA forward saves the state every kChunk steps; the backward restarts
// from those checkpoints. The fake kernels in mmvmamba/ops/_ext.py mirror it.
constexpr int64_t kChunk = 64;

// ceil(a / b), for b > 0 and a >= 0: blocks, chunks, segments and waves.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// "(2, 3, 4)" for a tensor's sizes, for error messages.
std::string shape_str(const at::Tensor& t);

struct ScanShape {
  int64_t batch, channels, length, groups, per_group, d_state;
};

// Checks every argument (ranks, sizes, dtypes, devices, N <= kMaxDState) with
// TORCH_CHECK and returns the sizes. `device` is the device the kernel runs on.
ScanShape check_scan_args(const at::Tensor& u, const at::Tensor& delta,
                          const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C,
                          const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& delta_bias,
                          c10::DeviceType device);

// Checks the extra arguments of the backward (gradient and checkpoints).
void check_scan_grad_args(const at::Tensor& grad_out, const at::Tensor& u,
                          const at::Tensor& checkpoints,
                          const ScanShape& shape, bool cuda);

// A contiguous copy (or the tensor itself) of an optional argument, or an
// undefined tensor when it is absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// The input dtypes the kernels are instantiated for.
#define MMVMAMBA_DISPATCH_SCAN_TYPES(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

using FwdResult = std::tuple<at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;

// The fused four-direction scan of SS2D (cross_scan_fwd / _bwd, CUDA and
// CPU).
constexpr int64_t kDirections = 4;
// Largest state size N of the fused kernel (VMamba uses 16).
constexpr int64_t kMaxCrossDState = 16;
// Positions are computed in float arithmetic, exact below this length.
constexpr int64_t kMaxCrossLength = int64_t{1} << 22;

struct CrossShape {
  int64_t batch, height, width, d_inner, rank, d_state;
};

// Checks the fused op's arguments: u (batch, H*W, D) float32 / bfloat16,
// x_dbl (batch, H*W, 4, R + 2N) of u's dtype, float32 dt_weight (4, D, R),
// dt_bias (4, D), A (4D, N) and D (4D,), all on one CPU or CUDA device.
CrossShape check_cross_scan_args(const at::Tensor& u, const at::Tensor& x_dbl,
                                 const at::Tensor& dt_weight,
                                 const at::Tensor& dt_bias, const at::Tensor& A,
                                 const at::Tensor& D, int64_t height,
                                 int64_t width);

// Checks the backward's gradient (float32, like u) and checkpoints (the
// CUDA forward's; empty on the CPU).
void check_cross_scan_grad_args(const at::Tensor& grad_out, const at::Tensor& u,
                                const at::Tensor& checkpoints,
                                const CrossShape& shape);

// du, dx_dbl, d dt_weight, d dt_bias, dA, dD.
using CrossBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

}  // namespace mmvmamba
