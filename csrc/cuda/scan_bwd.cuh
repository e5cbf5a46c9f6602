// The backward kernels: the full pass (every input's gradient) and, for
// sequences split into segments, the summary of each segment (see
// scan_fwd.cuh for what a summary is).
//
// The backward walks the chunks in reverse: it restarts from the state the
// forward saved, recomputes the chunk forward keeping the state every
// kPiece steps in registers, then for each kPiece-step piece recomputes its
// states (registers) and runs the reverse scan. dB / dC are summed over the
// warp's channels by a butterfly of shuffles, over the block's warps in
// shared memory after each piece (plain stores, one barrier a piece), and
// over blocks by float atomics.
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

// Sums vb (dB terms) and vc (dC terms) of the lanes holding the same states
// over the warp's channels: a butterfly that halves the values each stage.
// Afterwards the lane holds values [k*V, (k+1)*V) of the 2*kP, with k its
// channel within the warp and V = 2*kP*Q/32 (all dB or all dC terms, as V
// divides kP); it stores them in the warp's row of the step, dB terms of
// the states then dC terms (plain stores: the block's warps are summed
// after the piece, see Io::store_state_grads).
template <int Q>
__device__ __forceinline__ void reduce_state_grads(const float (&vb)[kP],
                                                   const float (&vc)[kP],
                                                   float* row, int q) {
  constexpr int kValues = 2 * kP;
  float v[kValues];
#pragma unroll
  for (int i = 0; i < kP; ++i) {
    v[i] = vb[i];
    v[kP + i] = vc[i];
  }
  const int lane_id = threadIdx.x % 32;
  int count = kValues;
#pragma unroll
  for (int mask = 16; mask >= Q; mask >>= 1) {
    const int half = count / 2;
    const bool upper = (lane_id & mask) != 0;
#pragma unroll
    for (int i = 0; i < kValues / 2; ++i) {
      if (i < half) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
      }
    }
    count = half;
  }
  constexpr int kKept = kValues * Q / 32;
  static_assert(kP % kKept == 0, "a lane keeps dB terms or dC terms only");
  const int base = (lane_id / Q) * kKept;
  float* at = row + (base < kP ? 0 : Tile<Q>::states) + q * kP + base % kP;
  if constexpr (kKept == 4) {
    *reinterpret_cast<float4*>(at) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kKept; ++j) at[j] = v[j];
  }
}

// kKeepDecays: a piece's decays exp2(a dt), computed for its states, are
// kept in registers for its reverse scan (one exponential per state and
// step fewer, 32 registers more, so 3 blocks per SM): the launch code takes
// it where shared memory allows no more blocks anyway.
template <typename Io, bool kKeepDecays>
__global__ void __launch_bounds__(kThreads, kKeepDecays
                                                ? Tile<Io::Q>::bwd_keep_blocks_per_sm
                                                : Tile<Io::Q>::bwd_blocks_per_sm)
    scan_bwd_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  constexpr int kPieces = kSteps / kPiece;
  extern __shared__ float smem[];
  const Smem shared = SmemLayout<Q, Pass::kBackward>::carve(smem);
  const TileSmem& tiles = shared.tile;
  float* u_s = tiles.u;
  float* dt_s = tiles.dt;
  float* dy_s = tiles.dy;
  float* B_s = tiles.B;
  float* C_s = tiles.C;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  float* part_b = shared.part + warp * 2 * kPiece * 32;
  float* part_a = part_b + kPiece * 32;
  float* extra = shared.extra;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  // The segment's chunks, in reverse from the carry of the later segments:
  // dh enters its last step as decay_next * dh (zero after the last one).
  const SegmentRange range = segment_range(p);
  float dh[kP] = {}, decay_next[kP] = {}, dA[kP] = {};
  if (range.end < p.chunks) {
    lane.read_states(lane.segment_state(p, pos.b, blockIdx.y), p.d_state, dh);
#pragma unroll
    for (int i = 0; i < kP; ++i) decay_next[i] = 1.0f;
  }
  // The (step, channel) outputs this lane finishes for each piece: index
  // lane + 32 i of the warp's kPiece x kWarpChannels, step = index % kPiece.
  // A step's du and d(delta) replace its u and step size in u_s / dt_s (no
  // later step of the tile reads them) until the tile is stored.
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOuts = kPiece * kWarpChannels;
  constexpr int kOutPerLane = (kOuts + 31) / 32;
  const int out_step = lane_id % kPiece;
  int out_c[kOutPerLane];
  float out_D[kOutPerLane], dD[kOutPerLane], dbias[kOutPerLane];
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    out_c[i] = warp * kWarpChannels + (lane_id + 32 * i) / kPiece;
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    const bool ok = d_in_group < p.per_group && lane_id + 32 * i < kOuts;
    const int64_t d = pos.g * p.per_group + (ok ? d_in_group : 0);
    out_D[i] = p.D != nullptr ? p.D[d] : 0.0f;
    dD[i] = dbias[i] = 0.0f;
  }

  if constexpr (Io::kPositions) {
    Io::index_chunk(p, pos, range.end - 1, extra);
    __syncthreads();
  }
  for (int chunk = range.end - 1; chunk >= range.first; --chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    typename Io::template Loads<true> tile;
    tile.fetch(p, pos, l0, extra);
    __syncthreads();
    tile.stage(p, pos, l0, tiles, extra);
    // The previous chunk's positions (Io::kPositions): the staging's barrier
    // follows the table's last reads (this chunk's fetch and staging), the
    // barrier below publishes it to the next fetch.
    if constexpr (Io::kPositions) {
      if (chunk > range.first) Io::index_chunk(p, pos, chunk - 1, extra);
    }
    __syncthreads();
    const float* urow = u_s + lane.c * kRow;
    const float* dtrow = dt_s + lane.c * kRow;
    const float* dyrow = dy_s + lane.c * kRow;
    // Pass 2 skips the pieces wholly past L (the sequence's last chunk only,
    // walked first by the last segment: dh is still zero there). Pass 1
    // walks them all: a data-dependent exit there makes the compiler spill
    // the piece starts.
    const int64_t left = p.length - l0;
    const int pieces = left < kSteps ? static_cast<int>((left + kPiece - 1) / kPiece)
                                     : kPieces;

    // Pass 1: the state at the start of every piece.
    float start[kPieces][kP];
    {
      float h[kP] = {};
      if (chunk > 0 && lane.valid) {
        const float* saved = lane.checkpoint(p, pos.b, chunk - 1);
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          if (lane.q * kP + i < p.d_state) h[i] = saved[lane.q * kP + i];
        }
      }
#pragma unroll
      for (int s = 0; s < kPieces; ++s) {
#pragma unroll
        for (int i = 0; i < kP; ++i) start[s][i] = h[i];
        if (s + 1 == kPieces) break;
#pragma unroll
        for (int t = s * kPiece; t < (s + 1) * kPiece; ++t) {
          const float dt = dtrow[t], dtu = dt * urow[t];
          const float4 b4 = *reinterpret_cast<const float4*>(
              B_s + t * Tl::state_row + lane.q * kP);
          const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
          for (int i = 0; i < kP; ++i) h[i] = exp2f(lane.a[i] * dt) * h[i] + dtu * bv[i];
        }
      }
    }

    // Pass 2: pieces in reverse; states of the piece, then the reverse scan.
#pragma unroll
    for (int s = kPieces - 1; s >= 0; --s) {
      if (s >= pieces) continue;
      // The warps' dB / dC terms of the piece: two buffers, alternating.
      float* grads = shared.state_grads + (s & 1) * kWarps * kPiece * Tl::grad_row;
      float* warp_grads = grads + warp * kPiece * Tl::grad_row;
      // The piece's states and (if kept) its decays exp2(a dt).
      float hs[kPiece][kP], decays[kKeepDecays ? kPiece : 1][kP];
#pragma unroll
      for (int k = 0; k < kPiece; ++k) {
        const int t = s * kPiece + k;
        const float dt = dtrow[t], dtu = dt * urow[t];
        const float4 b4 = *reinterpret_cast<const float4*>(
            B_s + t * Tl::state_row + lane.q * kP);
        const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          const float prev = k == 0 ? start[s][i] : hs[k - 1][i];
          const float decay = exp2f(lane.a[i] * dt);
          if constexpr (kKeepDecays) decays[k][i] = decay;
          hs[k][i] = decay * prev + dtu * bv[i];
        }
      }
#pragma unroll
      for (int k = kPiece - 1; k >= 0; --k) {
        const int t = s * kPiece + k;
        const float dt = dtrow[t], u = urow[t], g = dyrow[t];
        const float4 b4 = *reinterpret_cast<const float4*>(
            B_s + t * Tl::state_row + lane.q * kP);
        const float4 c4 = *reinterpret_cast<const float4*>(
            C_s + t * Tl::state_row + lane.q * kP);
        const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
        const float cv[kP] = {c4.x, c4.y, c4.z, c4.w};
        const float dtu = dt * u;
        float vb[kP], vc[kP], sum_b = 0.0f, sum_a = 0.0f;
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          float decay;
          if constexpr (kKeepDecays) {
            decay = decays[k][i];
          } else {
            decay = exp2f(lane.a[i] * dt);
          }
          dh[i] = g * cv[i] + decay_next[i] * dh[i];
          decay_next[i] = decay;
          const float prev = k == 0 ? start[s][i] : hs[k - 1][i];
          const float w = dh[i] * decay * prev;  // dh_l dA_l h_{l-1}
          dA[i] += dt * w;
          sum_a += lane.a[i] * w;
          sum_b += dh[i] * bv[i];
          vb[i] = dh[i] * dtu;
          vc[i] = g * hs[k][i];
        }
        reduce_state_grads<Q>(vb, vc, warp_grads + k * Tl::grad_row, lane.q);
        part_b[part_index(k, lane_id)] = sum_b;
        part_a[part_index(k, lane_id)] = sum_a;
      }
      // du and d(delta) of the piece's steps from the lanes' partial sums.
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kOutPerLane; ++i) {
        if (lane_id + 32 * i < kOuts) {
          const int c = out_c[i], t = s * kPiece + out_step;
          const int first = (c % kWarpChannels) * Q;
          float sb = 0.0f, sa = 0.0f;
#pragma unroll
          for (int q = 0; q < Q; q += 4) {
            const int at = part_index(out_step, first + q);
            const float4 b4 = *reinterpret_cast<const float4*>(part_b + at);
            const float4 a4 = *reinterpret_cast<const float4*>(part_a + at);
            sb += (b4.x + b4.y) + (b4.z + b4.w);
            sa += (a4.x + a4.y) + (a4.z + a4.w);
          }
          const float dt = dt_s[c * kRow + t], u = u_s[c * kRow + t];
          const float g = dy_s[c * kRow + t];
          float ddt = sb * u + sa * kLn2;
          if (p.softplus) ddt *= -expm1f(-dt);  // sigmoid(x) = 1 - e^-softplus(x)
          dbias[i] += ddt;
          dD[i] += g * u;
          u_s[c * kRow + t] = sb * dt + out_D[i] * g;
          dt_s[c * kRow + t] = ddt;
        }
      }
      // The block's dB / dC of the piece: every warp's terms are stored (and
      // the other buffer, the last piece's, was read by every thread).
      __syncthreads();
      Io::store_state_grads(p, pos, l0 + s * kPiece, grads, tiles);
    }
    __syncthreads();
    Io::store_grads(p, pos, l0, tiles, extra);
  }
  Io::finish(p, pos, extra);
  if (lane.valid) {
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int n = lane.q * kP + i;
      if (n < p.d_state) atomicAdd(p.dA + lane.d * p.d_state + n, dA[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    if (lane_id + 32 * i < kOuts && d_in_group < p.per_group) {
      atomicAdd(p.dD + pos.g * p.per_group + d_in_group, dD[i]);
      atomicAdd(p.ddelta_bias + pos.g * p.per_group + d_in_group, dbias[i]);
    }
  }
}

// Backward: segments 1 .. S-1 (blockIdx.y + 1), chunks and steps in
// reverse, to seg_state / seg_dt.
template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::bwd_blocks_per_sm)
    scan_bwd_summary_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  extern __shared__ float smem[];
  const Smem shared = SmemLayout<Q, Pass::kBackwardSummary>::carve(smem);
  const TileSmem& s = shared.tile;
  float* extra = shared.extra;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  const int seg = blockIdx.y + 1;
  const SegmentRange range = segment_range(p, 1);
  const float* dtrow = s.dt + lane.c * kRow;
  const float* dyrow = s.dy + lane.c * kRow;
  float dh[kP] = {}, decay_next[kP] = {}, dt_sum = 0.0f;
  typename Io::template Loads<true> tile;
  if constexpr (Io::kPositions) {
    Io::index_chunk(p, pos, range.end - 1, extra);
    __syncthreads();
  }
  tile.fetch(p, pos, static_cast<int64_t>(range.end - 1) * kSteps, extra);
  for (int chunk = range.end - 1; chunk >= range.first; --chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, s, extra);
    // As in scan_bwd_kernel.
    if constexpr (Io::kPositions) {
      if (chunk > range.first) Io::index_chunk(p, pos, chunk - 1, extra);
    }
    __syncthreads();
    if (chunk > range.first) tile.fetch(p, pos, l0 - kSteps, extra);
#pragma unroll 8
    for (int t = kSteps - 1; t >= 0; --t) {
      const float dt = dtrow[t], g = dyrow[t];
      const float4 c4 = *reinterpret_cast<const float4*>(
          s.C + t * Tl::state_row + lane.q * kP);
      const float cv[kP] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
      for (int i = 0; i < kP; ++i) {
        dh[i] = g * cv[i] + decay_next[i] * dh[i];
        decay_next[i] = exp2f(lane.a[i] * dt);
      }
      dt_sum += dt;
    }
  }
#pragma unroll
  for (int i = 0; i < kP; ++i) dh[i] *= decay_next[i];
  lane.write_states(lane.segment_state(p, pos.b, seg), p.d_state, dh);
  if (lane.valid && lane.q == 0) {
    p.seg_dt[(pos.b * p.channels + lane.d) * p.segments + seg] = dt_sum;
  }
}

}  // namespace scan_cuda
}  // namespace mmvmamba
