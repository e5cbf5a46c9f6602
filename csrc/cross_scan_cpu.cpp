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

#include <cstdlib>
#include <string>
#include <vector>

#include "cross_scan_cpu.h"
#include "scan.h"

namespace mmvmamba {
namespace {

struct CrossKernels {
  decltype(&cpu::generic::cross_lanes) lanes;
  decltype(&cpu::generic::cross_scratch_floats) scratch_floats;
  decltype(&cpu::generic::cross_forward_block) forward_block;
};

// The widest instruction set the processor has, or the one that
// MMVMAMBA_CPU_ISA names (avx512, avx2 or generic; for tests and
// comparisons), if the processor has it.
const CrossKernels& cross_kernels() {
  static const CrossKernels kernels = [] {
    const char* env = std::getenv("MMVMAMBA_CPU_ISA");
    const std::string want = env == nullptr ? "" : env;
    TORCH_CHECK(want.empty() || want == "avx512" || want == "avx2" ||
                    want == "generic",
                "MMVMAMBA_CPU_ISA must be avx512, avx2 or generic (or unset), "
                "got '", want, "'");
#ifdef MMVMAMBA_CROSS_CPU_X86
    if ((want.empty() || want == "avx512") &&
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return CrossKernels{cpu::avx512::cross_lanes,
                          cpu::avx512::cross_scratch_floats,
                          cpu::avx512::cross_forward_block};
    }
    if (want != "generic" && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return CrossKernels{cpu::avx2::cross_lanes, cpu::avx2::cross_scratch_floats,
                          cpu::avx2::cross_forward_block};
    }
#endif
    return CrossKernels{cpu::generic::cross_lanes,
                        cpu::generic::cross_scratch_floats,
                        cpu::generic::cross_forward_block};
  }();
  return kernels;
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

FwdResult cross_scan_fwd_cpu(const at::Tensor& u_in, const at::Tensor& x_dbl_in,
                             const at::Tensor& dt_weight_in,
                             const at::Tensor& dt_bias_in, const at::Tensor& A_in,
                             const at::Tensor& D_in, int64_t height,
                             int64_t width) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  const at::Tensor u = u_in.contiguous(), x_dbl = x_dbl_in.contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous();
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty(u.sizes(), f32);
  at::Tensor checkpoints = at::empty({0}, f32);
  if (out.numel() == 0) return {out, checkpoints};

  const CrossKernels& kernels = cross_kernels();
  const int64_t L = s.height * s.width;
  const std::vector<int32_t> orders = scan_orders(s.height, s.width);
  const int64_t lanes = kernels.lanes();
  const int64_t blocks = (s.d_inner + lanes - 1) / lanes;
  const int64_t in_bytes = u.element_size();
  cpu::CrossArgs base{};
  base.length = L;
  base.d_inner = s.d_inner;
  base.rank = s.rank;
  base.d_state = s.d_state;
  base.bf16 = u.scalar_type() == at::kBFloat16;
  base.dt_weight = dt_weight.const_data_ptr<float>();
  base.dt_bias = dt_bias.const_data_ptr<float>();
  base.A = A.const_data_ptr<float>();
  base.D = D.const_data_ptr<float>();
  base.orders = orders.data();
  const char* u_data = static_cast<const char*>(u.const_data_ptr());
  const char* x_dbl_data = static_cast<const char*>(x_dbl.const_data_ptr());
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t x_dbl_row = kDirections * (s.rank + 2 * s.d_state);
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kernels.scratch_floats(s.rank));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks;
      cpu::CrossArgs a = base;
      a.u = u_data + b * L * s.d_inner * in_bytes;
      a.x_dbl = x_dbl_data + b * L * x_dbl_row * in_bytes;
      a.out = out_data + b * L * s.d_inner;
      kernels.forward_block(a, (t % blocks) * lanes, scratch.data());
    }
  });
  return {out, checkpoints};
}

}  // namespace
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CPU, m) {
  m.impl("cross_scan_fwd", &mmvmamba::cross_scan_fwd_cpu);
}
