// The fused cross-scan CPU kernel for the baseline instruction set of the
// compiler's target, 4 floats a vector.
#define MMV_ISA generic
#define MMV_VEC_BYTES 16
#include "cross_scan_cpu_kernel.h"
