// MMVMAMBA_CPU_ISA: the widest instruction set the CPU kernels may use, read
// at each call (tests and comparisons use it): unset, empty or "auto" (the
// widest this processor and build have), "avx512", "avx2" or "generic". Each
// kernel family then takes the widest it was built for within that limit;
// naming a set this processor lacks is an error.
#pragma once

namespace mmvmamba {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The processor's widest set (AVX-512 F/BW/DQ/VL, AVX2 + FMA, or generic).
CpuIsa processor_isa();

// The limit MMVMAMBA_CPU_ISA sets now (checked: an unknown name, or a set
// this processor lacks, raises).
CpuIsa cpu_isa_limit();

const char* cpu_isa_name(CpuIsa isa);

}  // namespace mmvmamba
