// The fused cross-scan CPU kernel for x86-64 with AVX2 and FMA, 8 floats a
// vector, chosen at run time when the processor has them. Standard headers
// are included before the pragma, so only this kernel is compiled for AVX2.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cross_scan_cpu.h"

#ifdef MMVMAMBA_CROSS_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMV_ISA avx2
#define MMV_VEC_BYTES 32
#include "cross_scan_cpu_kernel.h"
#pragma GCC pop_options
#endif
