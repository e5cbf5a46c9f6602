// Row-level CPU kernels of the selective scan (scan_cpu_kernel.h), built once
// per instruction set; scan_cpu.cpp picks one at run time. Plain C++ only.
#pragma once

#include <cstdint>

namespace mmvmamba::cpu {

// One (batch, channel) row: float32 arrays, B and C transposed to (L, NP)
// and A padded to NP = 8 * nv states with zeros.
struct RowArgs {
  int64_t length;
  const float* u;   // (L,)
  const float* dt;  // (L,) step sizes after bias and softplus
  const float* A;   // (NP,)
  const float* Bt;  // (L, NP)
  const float* Ct;  // (L, NP)
  float D;
};

// Backward outputs of one row. du / ddt are written; dA, dBt, dCt and dD are
// accumulated (dBt, dCt over the channels of a group).
struct RowGrads {
  const float* dy;  // (L,)
  float* states;    // (L, NP) scratch: the states h_l
  float* decays;    // (L, NP) scratch: exp(dt_l A)
  float* du;        // (L,)
  float* ddt;       // (L,) gradient w.r.t. the step sizes
  float* dA;        // (NP,)
  float* dBt;       // (L, NP)
  float* dCt;       // (L, NP)
  float* dD;        // scalar
};

#define MMVMAMBA_DECLARE_CPU_ROWS(isa)                                       \
  namespace isa {                                                            \
  void step_sizes(int64_t n, const float* delta, float bias, bool softplus, \
                  float* dt);                                                \
  void softplus_grad(int64_t n, const float* delta, float bias, float* ddt); \
  void forward_row(int nv, const RowArgs& a, float* y);                      \
  void backward_row(int nv, const RowArgs& a, const RowGrads& g);            \
  }

MMVMAMBA_DECLARE_CPU_ROWS(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMVMAMBA_CPU_AVX2 1
MMVMAMBA_DECLARE_CPU_ROWS(avx2)
#endif
#undef MMVMAMBA_DECLARE_CPU_ROWS

}  // namespace mmvmamba::cpu
