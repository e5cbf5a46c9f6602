// CPU scan rows for the baseline instruction set of the compiler's target.
#define MMV_ISA generic
#include "scan_cpu_kernel.h"
