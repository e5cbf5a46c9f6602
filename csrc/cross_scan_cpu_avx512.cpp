// The fused cross-scan CPU kernel for x86-64 with AVX-512 (F, BW, DQ, VL),
// 16 floats a vector, chosen at run time when the processor has it. Standard
// headers are included before the pragma, so only this kernel is compiled
// for AVX-512.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cross_scan_cpu.h"

#ifdef MMVMAMBA_CROSS_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define MMV_ISA avx512
#define MMV_VEC_BYTES 64
#include "cross_scan_cpu_kernel.h"
#pragma GCC pop_options
#endif
