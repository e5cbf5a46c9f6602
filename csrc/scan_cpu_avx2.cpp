// CPU scan rows for x86-64 with AVX2 and FMA, chosen at run time when the
// processor has them. Everything compiled under the pragma lives in the
// mmvmamba::cpu::avx2 namespace (standard headers are included before it).
#include <cstdint>
#include <cstring>

#include "scan_cpu.h"

#ifdef MMVMAMBA_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMV_ISA avx2
#include "scan_cpu_kernel.h"
#pragma GCC pop_options
#endif
