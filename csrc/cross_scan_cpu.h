// CPU kernels of SS2D's fused four-direction scan (cross_scan_cpu_kernel.h),
// built once per instruction set; cross_scan_cpu.cpp picks one at run time.
// Plain C++ only.
#pragma once

#include <cstdint>

namespace mmvmamba::cpu {

// One batch entry of mmvmamba::cross_scan_fwd. u holds float32, or bfloat16
// bits when `bf16`; x_dbl and the parameters are float32 (the launcher
// upcasts a bfloat16 x_dbl once, exactly, so that each channel block reads
// its rows in place instead of converting them again).
struct CrossArgs {
  int64_t length, d_inner, rank, d_state;  // L = H*W, D, R, N
  bool bf16;
  const void* u;           // (L, D) channels-last map
  const float* x_dbl;      // (L, 4, R + 2N): (dt_low, B, C) per direction
  const float* dt_weight;  // (4, D, R)
  const float* dt_bias;    // (4, D)
  const float* A;          // (4D, N)
  const float* D;          // (4D,)
  const int32_t* orders;   // (2, L): positions of the row and column orders
  float* out;              // (L, D): the four directions summed
};

// Backward outputs of one batch entry, float32. du is written (this
// direction's share); the others are added to.
struct CrossGrads {
  const float* dout;  // (L, D) gradient of out
  float* du;          // (L, D)
  float* dx_dbl;      // (L, 4, R + 2N)
  float* dt_weight;   // (4, D, R)
  float* dt_bias;     // (4, D)
  float* dA;          // (4D, N)
  float* dD;          // (4D,)
};

// cross_lanes(): channels per vector. cross_scratch_floats(R, L, backward):
// floats of scratch, aligned to 64 bytes, that one call of the forward or
// backward needs. cross_forward_block(a, c0, scratch): runs the four scans
// of channels [c0, c0 + lanes) (fewer at the end of D) and writes their sum
// to a.out. cross_backward_block(a, g, k, c0, scratch): the backward of
// direction k of those channels.
#define MMVMAMBA_DECLARE_CROSS_CPU(isa)                                     \
  namespace isa {                                                           \
  int cross_lanes();                                                        \
  int64_t cross_scratch_floats(int64_t rank, int64_t length, bool backward); \
  void cross_forward_block(const CrossArgs& a, int64_t c0, float* scratch);  \
  void cross_backward_block(const CrossArgs& a, const CrossGrads& g, int k,  \
                            int64_t c0, float* scratch);                     \
  }

MMVMAMBA_DECLARE_CROSS_CPU(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMVMAMBA_CROSS_CPU_X86 1
MMVMAMBA_DECLARE_CROSS_CPU(avx2)
MMVMAMBA_DECLARE_CROSS_CPU(avx512)
#endif
#undef MMVMAMBA_DECLARE_CROSS_CPU

}  // namespace mmvmamba::cpu
