// The forward kernels: the full pass and, for sequences split into segments
// (scan_launch.cuh), the summary of each segment. The full pass writes y
// and saves every row's state at the end of each chunk (the checkpoints the
// backward restarts from).
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::fwd_blocks_per_sm)
    scan_fwd_kernel(const ScanParams p) {
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
  // The outputs this lane sums: step lane % kPart of channels
  // lane / kPart + 2 i of the warp. A step's y replaces its step size in
  // s.dt (no later step of the tile reads it) until the tile is stored.
  const int out_step = lane_id % kPart;
  int out_c[kOutPerLane];
  float out_D[kOutPerLane];
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    out_c[i] = warp * kWarpChannels + lane_id / kPart + 2 * i;
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    const bool ok = d_in_group < p.per_group;
    const int64_t d = pos.g * p.per_group + (ok ? d_in_group : 0);
    out_D[i] = p.D != nullptr ? p.D[d] : 0.0f;
  }

  typename Io::template Loads<false> tile;
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
    tile.stage(p, pos, l0, s, extra);
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
    for (int t0 = 0; t0 < steps; t0 += kPart) {
      const int piece = steps - t0 < kPart ? steps - t0 : kPart;
      // Whole pieces (steps past L are zero steps: identities); unrolling
      // all 16 steps spills the bfloat16 instantiation.
#pragma unroll 8
      for (int k = 0; k < kPart; ++k) {
        const int t = t0 + k;
        const float dt = s.dt[lane.c * kRow + t];
        const float dtu = dt * s.u[lane.c * kRow + t];
        const float4 b4 = *reinterpret_cast<const float4*>(
            s.B + t * Tl::state_row + lane.q * kP);
        const float4 c4 = *reinterpret_cast<const float4*>(
            s.C + t * Tl::state_row + lane.q * kP);
        const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
        const float cv[kP] = {c4.x, c4.y, c4.z, c4.w};
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          h[i] = exp2f(lane.a[i] * dt) * h[i] + dtu * bv[i];
          acc += cv[i] * h[i];
        }
        part[part_index(k, lane_id)] = acc;
      }
      __syncwarp();
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
  typename Io::template Loads<false> tile;
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
