// The fused four-direction scan (cross_scan_fwd / _bwd) specialised for one
// state (N = 1, VMamba2's d_state): kernels of their own (cross_scan_n1.cu)
// that cross_scan.cu dispatches to. Same op, same inputs and outputs, and the
// same checkpoints as the generic kernels (the state at the end of every
// chunk of kChunk steps, (batch, 4D, chunks, 1)), so either backward runs
// after either forward.
//
// Layout: one thread per channel, its state a scalar register; a block is
// up to 4 warps of consecutive channels of one direction and batch element,
// so a warp reads 32 consecutive channels (coalesced) at each position.
// Per chunk of 64 steps the block stages in shared memory what all its
// channels share: the positions of the 64 steps and their x_dbl rows
// (dt_low, B, C), transposed to [row][step] so that 4 steps read as one
// float4. A thread computes its step sizes 16 steps at a time (dt_weight
// rows in shared memory), scans, and adds y into the output with a float
// atomic (the four directions meet there). The backward recomputes each
// chunk from its checkpoint (the states every 16 steps in shared memory),
// walks 16-step pieces in reverse, sums dB / dC over the warp by a
// butterfly of shuffles and d dt_low over the block's channels as a small
// matrix product in shared memory, then adds them into dx_dbl with atomics.
//
// No sequence segments: the kernels run one block per (batch, direction,
// channel block) over the whole sequence, so they are used (MMVMAMBA_SCAN_N1
// unset, empty or "auto") only when those blocks give every SM at least
// kN1MinWarpsPerSm warps; smaller launches take the generic kernels, which
// split long sequences into segments. MMVMAMBA_SCAN_N1=0 never uses them,
// =1 whenever N = 1 (and their shared memory fits).
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

// Warps per SM below which the automatic choice keeps the generic kernels.
constexpr int kN1MinWarpsPerSm = 8;

// Whether the N = 1 kernels run this pass of the fused op (p made by
// cross_scan.cu; N = 1 required). Reads MMVMAMBA_SCAN_N1 on every call.
bool use_n1(const ScanParams& p, bool backward);

// Runs the forward (y, checkpoints) or the backward (du, dx_dbl and the
// parameters' gradients, all float32 accumulators zeroed by the caller) of
// the fused op on the N = 1 kernels; T is float, c10::Half or
// c10::BFloat16.
template <typename T>
void launch_n1(ScanParams& p, bool backward);

}  // namespace scan_cuda
}  // namespace mmvmamba
