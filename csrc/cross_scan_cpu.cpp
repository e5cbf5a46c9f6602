// CPU implementation of mmvmamba::cross_scan_fwd, SS2D's fused four-direction
// scan of a channels-last map (see cross_scan_cpu_kernel.h).
//
// Tasks are (batch entry, block of `lanes` channels), spread over
// at::parallel_for; each runs the block's four scans one after the other, so
// no two tasks write the same output. Nothing of size (batch, 4, D, L) is
// made: the map is read in each order by index, the step sizes come from
// dt_low inside the kernel, and the four outputs are summed in place. The
// CPU has no backward op: it returns no checkpoints (an empty tensor).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "cross_scan_cpu.h"
#include "scan.h"

namespace mmvmamba {
namespace {

struct CrossKernels {
  decltype(&cpu::generic::cross_lanes) lanes;
  decltype(&cpu::generic::cross_scratch_floats) scratch_floats;
  decltype(&cpu::generic::cross_forward_block) forward_block;
  decltype(&cpu::generic::cross_backward_block) backward_block;
};

// The widest kernels built within the limit of MMVMAMBA_CPU_ISA (cpu_isa.h),
// picked at each call.
const CrossKernels& cross_kernels() {
  static const CrossKernels generic{
      cpu::generic::cross_lanes, cpu::generic::cross_scratch_floats,
      cpu::generic::cross_forward_block, cpu::generic::cross_backward_block};
#ifdef MMVMAMBA_CROSS_CPU_X86
  static const CrossKernels avx512{
      cpu::avx512::cross_lanes, cpu::avx512::cross_scratch_floats,
      cpu::avx512::cross_forward_block, cpu::avx512::cross_backward_block};
  static const CrossKernels avx2{
      cpu::avx2::cross_lanes, cpu::avx2::cross_scratch_floats,
      cpu::avx2::cross_forward_block, cpu::avx2::cross_backward_block};
  switch (cpu_isa_limit()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    default: return generic;
  }
#else
  cpu_isa_limit();  // checks the setting
  return generic;
#endif
}

// (2, L): the row-major positions of step l of the row order (l itself) and
// of the column order (l = w H + h).
std::vector<int32_t> scan_orders(int64_t height, int64_t width) {
  const int64_t L = height * width;
  std::vector<int32_t> orders(2 * L);
  for (int64_t l = 0; l < L; ++l) {
    orders[l] = static_cast<int32_t>(l);
    orders[L + l] = static_cast<int32_t>((l % height) * width + l / height);
  }
  return orders;
}

// Per-thread scratch of the kernels, aligned to 64 bytes.
class Scratch {
 public:
  explicit Scratch(int64_t floats) : buffer_(floats + 16) {}
  float* data() {
    const auto address = reinterpret_cast<std::uintptr_t>(buffer_.data());
    return buffer_.data() + ((64 - address % 64) % 64) / sizeof(float);
  }

 private:
  std::vector<float> buffer_;
};

// The map as the kernels read it: float32 or bfloat16 as it is, float16 as
// its float32 upcast (exact).
at::Tensor kernel_map(const at::Tensor& u) {
  return (u.scalar_type() == at::kHalf ? u.to(at::kFloat) : u).contiguous();
}

// The arguments of one batch entry of the kernels; x_dbl float32 (see
// cpu::CrossArgs).
struct CrossCall {
  cpu::CrossArgs base;
  const char* u;
  const float* x_dbl;
  int64_t in_bytes, x_dbl_row;
  std::vector<int32_t> orders;

  CrossCall(const CrossShape& s, const at::Tensor& u_, const at::Tensor& x_dbl_,
            const at::Tensor& dt_weight, const at::Tensor& dt_bias,
            const at::Tensor& A, const at::Tensor& D)
      : base{}, orders(scan_orders(s.height, s.width)) {
    base.length = s.height * s.width;
    base.d_inner = s.d_inner;
    base.rank = s.rank;
    base.d_state = s.d_state;
    base.bf16 = u_.scalar_type() == at::kBFloat16;
    base.dt_weight = dt_weight.const_data_ptr<float>();
    base.dt_bias = dt_bias.const_data_ptr<float>();
    base.A = A.const_data_ptr<float>();
    base.D = D.const_data_ptr<float>();
    base.orders = orders.data();
    u = static_cast<const char*>(u_.const_data_ptr());
    x_dbl = x_dbl_.const_data_ptr<float>();
    in_bytes = u_.element_size();
    x_dbl_row = kDirections * (s.rank + 2 * s.d_state);
  }

  cpu::CrossArgs entry(int64_t b) const {
    cpu::CrossArgs a = base;
    a.u = u + b * a.length * a.d_inner * in_bytes;
    a.x_dbl = x_dbl + b * a.length * x_dbl_row;
    return a;
  }
};

FwdResult cross_scan_fwd_cpu(const at::Tensor& u_in, const at::Tensor& x_dbl_in,
                             const at::Tensor& dt_weight_in,
                             const at::Tensor& dt_bias_in, const at::Tensor& A_in,
                             const at::Tensor& D_in, int64_t height,
                             int64_t width) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  const at::Tensor u = kernel_map(u_in),
                   x_dbl = x_dbl_in.to(at::kFloat).contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous();
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty(u.sizes(), f32);
  at::Tensor checkpoints = at::empty({0}, f32);
  if (out.numel() == 0) return {out, checkpoints};

  const CrossKernels& kernels = cross_kernels();
  const CrossCall call(s, u, x_dbl, dt_weight, dt_bias, A, D);
  const int64_t L = s.height * s.width;
  const int64_t lanes = kernels.lanes();
  const int64_t blocks = ceil_div(s.d_inner, lanes);
  float* out_data = out.mutable_data_ptr<float>();
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(kernels.scratch_floats(s.rank, L, /*backward=*/false));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks;
      cpu::CrossArgs a = call.entry(b);
      a.out = out_data + b * L * s.d_inner;
      kernels.forward_block(a, (t % blocks) * lanes, scratch.data());
    }
  });
  return {out, checkpoints};
}

// Tasks are (batch entry, direction, group of channel blocks): a task owns
// its direction's du (one float32 map per direction, summed afterwards) and
// its group's share of dx_dbl (one buffer per group when there are several);
// the parameter gradients are kept per batch entry and summed.
CrossBwdResult cross_scan_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& x_dbl_in,
    const at::Tensor& dt_weight_in, const at::Tensor& dt_bias_in,
    const at::Tensor& A_in, const at::Tensor& D_in, int64_t height, int64_t width,
    const at::Tensor& checkpoints) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  check_cross_scan_grad_args(grad_in, u_in, checkpoints, s);
  const at::Tensor dout = grad_in.contiguous(), u = kernel_map(u_in),
                   x_dbl = x_dbl_in.to(at::kFloat).contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous();
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t L = s.height * s.width;
  if (u.numel() == 0) {
    return {at::zeros(u.sizes(), u_in.options()),
            at::zeros(x_dbl.sizes(), x_dbl_in.options()),
            at::zeros(dt_weight.sizes(), f32), at::zeros(dt_bias.sizes(), f32),
            at::zeros(A.sizes(), f32), at::zeros(D.sizes(), f32)};
  }
  const CrossKernels& kernels = cross_kernels();
  const CrossCall call(s, u, x_dbl, dt_weight, dt_bias, A, D);
  const int64_t lanes = kernels.lanes();
  const int64_t blocks = ceil_div(s.d_inner, lanes);
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t groups = std::clamp<int64_t>(
      ceil_div(want, s.batch * kDirections), 1, blocks);
  const int64_t per_group = ceil_div(blocks, groups);
  const int64_t row = kDirections * (s.rank + 2 * s.d_state);
  at::Tensor du_dirs = at::empty({kDirections, s.batch, L, s.d_inner}, f32);
  at::Tensor dx_groups = at::zeros({groups, s.batch, L, row}, f32);
  at::Tensor dweight = at::zeros({s.batch, kDirections, s.d_inner, s.rank}, f32);
  at::Tensor dbias = at::zeros({s.batch, kDirections, s.d_inner}, f32);
  at::Tensor dA = at::zeros({s.batch, kDirections * s.d_inner, s.d_state}, f32);
  at::Tensor dD = at::zeros({s.batch, kDirections * s.d_inner}, f32);
  const float* dout_data = dout.const_data_ptr<float>();
  float* du_data = du_dirs.mutable_data_ptr<float>();
  float* dx_data = dx_groups.mutable_data_ptr<float>();
  float* dweight_data = dweight.mutable_data_ptr<float>();
  float* dbias_data = dbias.mutable_data_ptr<float>();
  float* dA_data = dA.mutable_data_ptr<float>();
  float* dD_data = dD.mutable_data_ptr<float>();
  const int64_t map = L * s.d_inner;
  const int64_t tasks = s.batch * kDirections * groups;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(kernels.scratch_floats(s.rank, L, /*backward=*/true));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t group = t % groups;
      const int64_t k = (t / groups) % kDirections;
      const int64_t b = t / (groups * kDirections);
      const cpu::CrossArgs a = call.entry(b);
      cpu::CrossGrads g;
      g.dout = dout_data + b * map;
      g.du = du_data + (k * s.batch + b) * map;
      g.dx_dbl = dx_data + (group * s.batch + b) * L * row;
      g.dt_weight = dweight_data + b * kDirections * s.d_inner * s.rank;
      g.dt_bias = dbias_data + b * kDirections * s.d_inner;
      g.dA = dA_data + b * kDirections * s.d_inner * s.d_state;
      g.dD = dD_data + b * kDirections * s.d_inner;
      const int64_t last = std::min(blocks, (group + 1) * per_group);
      for (int64_t block = group * per_group; block < last; ++block) {
        kernels.backward_block(a, g, static_cast<int>(k), block * lanes,
                               scratch.data());
      }
    }
  });
  at::Tensor dx = groups == 1 ? dx_groups[0] : dx_groups.sum(0);
  return {du_dirs.sum(0).to(u_in.scalar_type()),
          dx.view(x_dbl.sizes()).to(u_in.scalar_type()),
          dweight.sum(0),
          dbias.sum(0),
          dA.sum(0),
          dD.sum(0)};
}

}  // namespace
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CPU, m) {
  m.impl("cross_scan_fwd", &mmvmamba::cross_scan_fwd_cpu);
  m.impl("cross_scan_bwd", &mmvmamba::cross_scan_bwd_cpu);
}
