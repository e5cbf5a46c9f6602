// The forward kernels: the full pass and, for sequences split into segments
// (scan_launch.cuh), the summary of each segment. The full pass writes y
// and saves every row's state at the end of each chunk (the checkpoints the
// backward restarts from).
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

// One step's inputs of the recurrence in the tile: the step size and input
// of the lane's channel, B and C of its states; and, where computed ahead of
// the step (set_decays), its decays exp2(a dt).
struct StepInputs {
  float dt, u;
  float4 b, c;
  float decay[kP];
};

template <int Q>
__device__ __forceinline__ StepInputs load_step(const TileSmem& s, const Lane<Q>& lane,
                                                int t) {
  StepInputs in;
  in.dt = s.dt[lane.c * kRow + t];
  in.u = s.u[lane.c * kRow + t];
  in.b = *reinterpret_cast<const float4*>(s.B + t * Tile<Q>::state_row + lane.q * kP);
  in.c = *reinterpret_cast<const float4*>(s.C + t * Tile<Q>::state_row + lane.q * kP);
  return in;
}

__device__ __forceinline__ void set_decays(StepInputs& in, const float (&a)[kP]) {
#pragma unroll
  for (int i = 0; i < kP; ++i) in.decay[i] = exp2f(a[i] * in.dt);
}

// One step of the lane's states (a: A log2 e; in.decay if kDecaysSet);
// returns the lane's partial of y, its C h summed in state order from zero.
template <bool kDecaysSet>
__device__ __forceinline__ float scan_step(float (&h)[kP], const float (&a)[kP],
                                           const StepInputs& in) {
  const float dtu = in.dt * in.u;
  const float bv[kP] = {in.b.x, in.b.y, in.b.z, in.b.w};
  const float cv[kP] = {in.c.x, in.c.y, in.c.z, in.c.w};
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kP; ++i) {
    h[i] = (kDecaysSet ? in.decay[i] : exp2f(a[i] * in.dt)) * h[i] + dtu * bv[i];
    acc += cv[i] * h[i];
  }
  return acc;
}

// kTensorSteps (an Io with kMayTensorStepSizes): the tile's step sizes on
// the tensor cores, at the register bound of fwd_tensor_blocks_per_sm.
template <typename Io, bool kTensorSteps = false>
__global__ void __launch_bounds__(kThreads, kTensorSteps
                                                ? Tile<Io::Q>::fwd_tensor_blocks_per_sm
                                                : Tile<Io::Q>::fwd_blocks_per_sm)
    scan_fwd_kernel(const ScanParams p) {
  static_assert(!kTensorSteps || Io::kMayTensorStepSizes, "an Io with a rank product");
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOutPerLane = kWarpChannels * kPart / 32;
  extern __shared__ float smem[];
  const Smem shared = SmemLayout<Q, Pass::kForward>::carve(smem);
  const TileSmem& s = shared.tile;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  float* part = shared.part + warp * kPart * 32;
  float* extra = shared.extra;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  // The segment's chunks, from its start state (zero for the first).
  const SegmentRange range = segment_range(p);
  float h[kP] = {};
  if (range.first > 0) {
    lane.read_states(lane.segment_state(p, pos.b, blockIdx.y), p.d_state, h);
  }
  // The outputs this lane sums. Q = 4 (8 channels a warp, kRowPart): the
  // scan writes row k of `part` unswizzled (lane at step k * 32 + lane, fixed
  // offsets), and lane finishes channel lane % 8 at steps s0 + i, s0 = 8
  // (j % 2) + 4 (j / 2) for its quarter warp j: a quarter's float4 reads
  // (one step, 8 channels) fall in distinct banks, and the warp's u / y
  // accesses (rows of kRow) meet at most 2 lanes a bank. Other Q: step
  // lane % kPart of channels lane / kPart + 2 i of the warp, rows swizzled
  // by part_index. A step's y replaces its step size in s.dt (no later step
  // of the tile reads it) until the tile is stored.
  constexpr bool kRowPart = kWarpChannels == 8 && kPart == 16;
  const int out_step = kRowPart ? 8 * (lane_id / 8 % 2) + 4 * (lane_id / 16)
                                : lane_id % kPart;
  constexpr int kOutChannels = kRowPart ? 1 : kOutPerLane;
  int out_c[kOutChannels];
  float out_D[kOutChannels];
#pragma unroll
  for (int i = 0; i < kOutChannels; ++i) {
    out_c[i] = warp * kWarpChannels +
               (kRowPart ? lane_id % kWarpChannels : lane_id / kPart + 2 * i);
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    const bool ok = d_in_group < p.per_group;
    const int64_t d = pos.g * p.per_group + (ok ? d_in_group : 0);
    out_D[i] = p.D != nullptr ? p.D[d] : 0.0f;
  }

  // The schedule (Q = 4, Io::kFwdLoadsAhead): the inputs of the kAhead steps
  // after the scanned one are in registers (ahead[0] the next), and with
  // kAhead >= 2 ahead[0]'s decays too (computed while the step before it is
  // scanned, from a dt loaded one step earlier still). Measured on an H200
  // (docs/scan_kernel_notes.md): CrossIo 2, SeqIo 0 (loads at the step).
  constexpr int kAhead = kRowPart ? Io::kFwdLoadsAhead : 0;
  constexpr bool kDecaysAhead = kAhead >= 2;
  StepInputs ahead[kAhead > 0 ? kAhead : 1];

  typename Io::template Loads<Pass::kForward> tile;
  if constexpr (Io::kPositions) {
    Io::index_chunk(p, pos, range.first, extra);
    __syncthreads();
  }
  tile.fetch(p, pos, static_cast<int64_t>(range.first) * kSteps, extra);
  // `left` counts the segment's chunks down (a comparison with its end
  // instead spills the SeqIo<float, 16> instantiation).
  int chunk = range.first;
  for (int left = range.end - range.first; left > 0; --left, ++chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    const int steps = p.length - l0 < kSteps ? static_cast<int>(p.length - l0) : kSteps;
    __syncthreads();
    if constexpr (kTensorSteps) {
      tile.template stage<true>(p, pos, l0, s, extra);
    } else {
      tile.stage(p, pos, l0, s, extra);
    }
    // The next chunk's positions (Io::kPositions): the staging's barrier
    // follows the table's last reads (this chunk's), the barrier below
    // publishes it to the next fetch. (After the staging, whose loads'
    // registers are free by then.)
    if constexpr (Io::kPositions) {
      if (left > 1) Io::index_chunk(p, pos, chunk + 1, extra);
    }
    __syncthreads();
    // The next tile's loads fly while this one is scanned.
    if (left > 1) tile.fetch(p, pos, l0 + kSteps, extra);
#pragma unroll
    for (int i = 0; i < kAhead; ++i) ahead[i] = load_step(s, lane, i);
    if constexpr (kDecaysAhead) set_decays(ahead[0], lane.a);
    for (int t0 = 0; t0 < steps; t0 += kPart) {
      const int piece = steps - t0 < kPart ? steps - t0 : kPart;
      // The piece's groups of 8 steps (those past L in the last group are
      // zero steps: identities; groups wholly past L are skipped, a
      // block-uniform count). Unrolling all 16 steps spills the bfloat16
      // instantiation.
      for (int k0 = 0; k0 < piece; k0 += 8) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int k = k0 + j, t = t0 + k;
          float acc;
          if constexpr (kAhead > 0) {
            const StepInputs in = ahead[0];
#pragma unroll
            for (int i = 0; i + 1 < kAhead; ++i) ahead[i] = ahead[i + 1];
            if constexpr (kDecaysAhead) set_decays(ahead[0], lane.a);
            // Step t + kAhead's loads fly while step t is scanned (past the
            // tile's last step, that step again: row kSteps of C is `part`).
            ahead[kAhead - 1] = load_step(
                s, lane, j + kAhead < 8 ? t + kAhead : min(t + kAhead, kSteps - 1));
            acc = scan_step<kDecaysAhead>(h, lane.a, in);
          } else {
            // The same step, its loads at the step and written out: through
            // StepInputs, ptxas allocates SeqIo's kernels differently.
            const float dt = s.dt[lane.c * kRow + t];
            const float dtu = dt * s.u[lane.c * kRow + t];
            const float4 b4 = *reinterpret_cast<const float4*>(
                s.B + t * Tl::state_row + lane.q * kP);
            const float4 c4 = *reinterpret_cast<const float4*>(
                s.C + t * Tl::state_row + lane.q * kP);
            const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
            const float cv[kP] = {c4.x, c4.y, c4.z, c4.w};
            acc = 0.0f;
#pragma unroll
            for (int i = 0; i < kP; ++i) {
              h[i] = exp2f(lane.a[i] * dt) * h[i] + dtu * bv[i];
              acc += cv[i] * h[i];
            }
          }
          part[kRowPart ? k * 32 + lane_id : part_index(k, lane_id)] = acc;
        }
      }
      __syncwarp();
      if constexpr (kRowPart) {
        // Every output is summed (a step past the piece reads stale
        // partials), only those of the piece are stored.
        const float* src = part + out_step * 32 + (out_c[0] % kWarpChannels) * Q;
        const int at = out_c[0] * kRow + t0 + out_step;
#pragma unroll
        for (int i = 0; i < kOutPerLane; ++i) {
          const float4 v = *reinterpret_cast<const float4*>(src + i * 32);
          // From the first term (0 + x is x but for the sign of a zero,
          // which y loses: added to the zeros of the map).
          const float y = ((v.x + v.y) + (v.z + v.w)) + out_D[0] * s.u[at + i];
          if (out_step + i < piece) s.dt[at + i] = y;
        }
      } else {
        if (out_step < piece) {
          const int t = t0 + out_step;
#pragma unroll
          for (int i = 0; i < kOutPerLane; ++i) {
            const int first = (out_c[i] % kWarpChannels) * Q;
            float y = 0.0f;
#pragma unroll
            for (int q = 0; q < Q; q += 4) {
              const float4 v = *reinterpret_cast<const float4*>(
                  part + part_index(out_step, first + q));
              y += (v.x + v.y) + (v.z + v.w);
            }
            s.dt[out_c[i] * kRow + t] = y + out_D[i] * s.u[out_c[i] * kRow + t];
          }
        }
      }
      __syncwarp();
    }
    if (lane.valid) {
      float* saved = lane.checkpoint(p, pos.b, chunk);
#pragma unroll
      for (int i = 0; i < kP; ++i) {
        if (lane.q * kP + i < p.d_state) saved[lane.q * kP + i] = h[i];
      }
    }
    __syncthreads();
    Io::store_y(p, pos, l0, s);
  }
}

// Segment summaries (segments > 1). The forward summary of a segment is its
// end state when started from zero, and the backward one the carry leaving
// its first step, decay_first * dh_first, when entered with none; with the
// segment's sum of step sizes (the decay over it is exp2(a * sum)), that
// makes each segment an affine map of the carry, which scan_carry_kernel
// chains. The walks reuse the Io staging and do nothing else (no C or dy in
// the forward, no states in the backward, no outputs).

// Forward: segments 0 .. S-2 (blockIdx.y), to seg_state / seg_dt.
template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::fwd_blocks_per_sm)
    scan_fwd_summary_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  extern __shared__ float smem[];
  const Smem shared = SmemLayout<Q, Pass::kForwardSummary>::carve(smem);
  const TileSmem& s = shared.tile;
  float* extra = shared.extra;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  const SegmentRange range = segment_range(p);
  const float* urow = s.u + lane.c * kRow;
  const float* dtrow = s.dt + lane.c * kRow;
  float h[kP] = {}, dt_sum = 0.0f;
  typename Io::template Loads<Pass::kForwardSummary> tile;
  if constexpr (Io::kPositions) {
    Io::index_chunk(p, pos, range.first, extra);
    __syncthreads();
  }
  tile.fetch(p, pos, static_cast<int64_t>(range.first) * kSteps, extra);
  for (int chunk = range.first; chunk < range.end; ++chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, s, extra);
    // As in scan_fwd_kernel.
    if constexpr (Io::kPositions) {
      if (chunk + 1 < range.end) Io::index_chunk(p, pos, chunk + 1, extra);
    }
    __syncthreads();
    if (chunk + 1 < range.end) tile.fetch(p, pos, l0 + kSteps, extra);
#pragma unroll 8
    for (int t = 0; t < kSteps; ++t) {
      const float dt = dtrow[t], dtu = dt * urow[t];
      const float4 b4 = *reinterpret_cast<const float4*>(
          s.B + t * Tl::state_row + lane.q * kP);
      const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < kP; ++i) h[i] = exp2f(lane.a[i] * dt) * h[i] + dtu * bv[i];
      dt_sum += dt;
    }
  }
  lane.write_states(lane.segment_state(p, pos.b, blockIdx.y), p.d_state, h);
  if (lane.valid && lane.q == 0) {
    p.seg_dt[(pos.b * p.channels + lane.d) * p.segments + blockIdx.y] = dt_sum;
  }
}

}  // namespace scan_cuda
}  // namespace mmvmamba
