// Launch code of the CUDA scans: one pass (forward or backward) of an Io's
// scan, with the segments a long sequence is split into.
//
// Segments: when the blocks of one sequence are too few to fill the GPU
// (small batch, long L), the chunks are split into S segments of seg_chunks
// chunks (blockIdx.y) scanned in parallel. A pass then takes three kernels:
// a summary of every segment but the one never needed (the forward's end
// state from zero; the backward's carry leaving the segment when entered with
// none; and the sum of its step sizes, whose exp2(a * sum) is its decay),
// scan_carry_kernel chaining those into the carry entering each segment, and
// the full pass, each segment starting from its carry. Results equal the
// one-segment ones up to float rounding. S is chosen per launch
// (segment_chunks in csrc/segments.h: the forward only below half a wave of
// blocks, for about 2 waves; the backward below 4 waves, for 4); the
// environment variable
// MMVMAMBA_SCAN_SEGMENT_CHUNKS=n forces segments of n chunks (of 64 steps),
// and 0 a single segment (unset or empty: the choice above; any other value
// is an error). With one segment nothing extra runs.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>

#include "scan_bwd.cuh"
#include "scan_common.cuh"
#include "scan_fwd.cuh"

namespace mmvmamba {
namespace scan_cuda {

// The current device's SMs (asked of the driver once per device;
// scan_launch.cu).
int device_sms();

// Allows `kernel` `smem` bytes of dynamic shared memory on the current device
// (the driver is asked only to raise the limit; scan_launch.cu).
void allow_shared_bytes(const void* kernel, int smem);

// The blocks of `threads` threads and `smem` bytes of dynamic shared memory
// of `kernel` that an SM of the current device holds (the driver is asked
// once per device, kernel and size; scan_launch.cu).
int resident_blocks(const void* kernel, int threads, int smem);

// Sets p.seg_chunks / p.segments for a launch of `blocks` blocks per
// segment of the forward or backward pass (scan_launch.cu).
void choose_segments(ScanParams& p, int64_t blocks, int blocks_per_sm,
                     bool backward);

// Launches scan_carry_kernel over p's segment summaries (scan_launch.cu).
void launch_carry(const ScanParams& p, bool reverse, cudaStream_t stream);

// Dynamic shared memory of a kernel of Io's pass.
template <typename Io, Pass kPass>
int shared_bytes(const ScanParams& p) {
  return SmemLayout<Io::Q, kPass>::bytes(Io::extra_floats(p));
}

// Launches `kernel` over the blocks and segments (gridDim.y) of a pass.
template <typename Io, Pass kPass>
void launch_kernel(void (*kernel)(ScanParams), const ScanParams& p, dim3 grid,
                   cudaStream_t stream) {
  const int smem = shared_bytes<Io, kPass>(p);
  allow_shared_bytes(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The blocks of a scan kernel an SM holds with `smem` bytes of shared memory.
inline int resident_blocks(void (*kernel)(ScanParams), int smem) {
  return resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, smem);
}

// Whether the backward keeps a piece's decays in registers (see
// scan_bwd_kernel): only for an Io that allows it (Io::kMayKeepDecays), and
// where the block's shared memory (`smem` bytes) already holds the SM to
// fewer blocks than the kernel without them could run, so the 32 more
// registers cost no occupancy.
template <typename Io>
bool keep_decays(int smem) {
  if constexpr (Io::kMayKeepDecays) {
    return resident_blocks(scan_bwd_kernel<Io, false>, smem) <
           Tile<Io::Q>::bwd_blocks_per_sm;
  } else {
    return false;
  }
}

// Whether the forward computes its step sizes on the tensor cores (see
// scan_fwd_kernel) for a launch of `blocks` blocks of `smem` bytes: only for
// an Io with a rank product (Io::kMayTensorStepSizes). Wherever the block's
// shared memory already holds the SM to the tensor kernel's
// fwd_tensor_blocks_per_sm, it costs nothing; elsewhere its register bound
// costs a block per SM, which its product outweighs from rank
// Io::kTensorStepRank on (VMamba-T's stage 2) unless the lost block adds
// waves: a wave of the tensor kernel takes about 3/4 of the FMA kernel's
// there (measured at R = 24, batch 128: 24 waves against 19), so it runs
// where 3 x its waves <= 4 x theirs (not at 1024 x 1024, batch 6: stage 2's
// 576 blocks make 2 waves of 4 blocks a SM, 1 of 5 on an H200).
template <typename Io>
bool tensor_step_sizes(const ScanParams& p, int smem, int64_t blocks) {
  if constexpr (Io::kMayTensorStepSizes) {
    constexpr int kTensorBlocks = Tile<Io::Q>::fwd_tensor_blocks_per_sm;
    const int fma_blocks = resident_blocks(scan_fwd_kernel<Io, false>, smem);
    if (fma_blocks <= kTensorBlocks) return true;
    if (p.rank < Io::kTensorStepRank) return false;
    const int64_t sms = device_sms();
    const auto waves = [&](int per_sm) { return ceil_div(blocks, per_sm * sms); };
    return 3 * waves(kTensorBlocks) <= 4 * waves(fma_blocks);
  } else {
    return false;
  }
}

// One pass (forward or backward) of Io's scan. With several segments: their
// summaries (all but the one whose summary is never used), the carries
// between them, then the full pass of every segment; `f32` places the
// scratch tensors.
template <typename Io>
void launch(ScanParams& p, bool backward, const at::TensorOptions& f32) {
  using Tl = Tile<Io::Q>;
  p.channel_blocks = static_cast<int>(ceil_div(p.per_group, Tl::channels));
  const int64_t blocks = p.batch * p.groups * p.channel_blocks;
  TORCH_CHECK(blocks <= INT32_MAX, "selective_scan: batch x channels too "
              "large for one launch (", std::to_string(blocks), " blocks)");
  TORCH_CHECK(p.chunks < (int64_t{1} << 30), "selective_scan: sequence too "
              "long (", std::to_string(p.length), " steps)");
  const bool keep = backward && keep_decays<Io>(shared_bytes<Io, Pass::kBackward>(p));
  const bool tensor =
      !backward && tensor_step_sizes<Io>(p, shared_bytes<Io, Pass::kForward>(p), blocks);
  choose_segments(p, blocks,
                  backward ? keep ? Tl::bwd_keep_blocks_per_sm : Tl::bwd_blocks_per_sm
                  : tensor ? Tl::fwd_tensor_blocks_per_sm
                           : Tl::fwd_blocks_per_sm,
                  backward);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid_x = static_cast<unsigned>(blocks);
  // Freed when this returns: the caching allocator reuses memory in stream
  // order, after the kernels below.
  at::Tensor seg_state, seg_dt;
  if (p.segments > 1) {
    seg_state = at::empty({p.batch, p.channels, p.segments, p.d_state}, f32);
    seg_dt = at::empty({p.batch, p.channels, p.segments}, f32);
    p.seg_state = seg_state.mutable_data_ptr<float>();
    p.seg_dt = seg_dt.mutable_data_ptr<float>();
    const dim3 grid(grid_x, p.segments - 1);
    if (backward) {
      launch_kernel<Io, Pass::kBackwardSummary>(scan_bwd_summary_kernel<Io>, p,
                                                grid, stream);
    } else {
      launch_kernel<Io, Pass::kForwardSummary>(scan_fwd_summary_kernel<Io>, p,
                                               grid, stream);
    }
    launch_carry(p, backward, stream);
  }
  const dim3 grid(grid_x, p.segments);
  if (backward) {
    if constexpr (Io::kMayKeepDecays) {
      if (keep) {
        launch_kernel<Io, Pass::kBackward>(scan_bwd_kernel<Io, true>, p, grid, stream);
        return;
      }
    }
    launch_kernel<Io, Pass::kBackward>(scan_bwd_kernel<Io, false>, p, grid, stream);
  } else {
    if constexpr (Io::kMayTensorStepSizes) {
      if (tensor) {
        launch_kernel<Io, Pass::kForward>(scan_fwd_kernel<Io, true>, p, grid, stream);
        return;
      }
    }
    launch_kernel<Io, Pass::kForward>(scan_fwd_kernel<Io, false>, p, grid, stream);
  }
}

}  // namespace scan_cuda
}  // namespace mmvmamba
