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

// Index of (step, lane) in a warp's scratch of the lanes' partial sums of a
// piece (kPiece rows of 32 lanes). With one channel a step (Q = 4: 8
// channels, kPiece steps) the rows are not swizzled: the lanes finishing the
// piece read channel lane % kPiece at steps lane / kPiece + 4 i (see
// scan_bwd_kernel), so a quarter warp's float4 reads (8 lanes, 8 channels)
// fall in distinct banks, and the scan's writes take fixed offsets. Other Q
// use part_index's swizzle.
template <int Q>
__device__ __forceinline__ int piece_part_index(int step, int lane) {
  if constexpr (32 / Q == kPiece) {
    return step * 32 + lane;
  } else {
    return part_index(step, lane);
  }
}

// The backward's dB / dC terms of a piece lie in one buffer (two would cost
// the 4th block per SM at R = 24, VMamba-T's stage 2): before a piece's
// first store into it, the barrier after which every thread has read the
// previous piece's (store_state_grads). Pieces run from `pieces` - 1 down;
// the first of a chunk needs none (the chunk's own barriers come between).
__device__ __forceinline__ void piece_grads_free(int s, int pieces) {
  if (s + 1 < pieces) __syncthreads();
}

// The backward of an Io whose lanes hold kP states of one channel (Q lanes
// a channel; see scan_common.cuh), run by scan_bwd_kernel below. Its
// decays are recomputed in the reverse scan (the plain op's SeqIo never
// keeps them).
template <typename Io>
__device__ __forceinline__ void scan_bwd_lanes(const ScanParams& p) {
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
  // lane + 32 i of the warp's kPiece x kWarpChannels. Q = 4 (a channel per
  // step of a piece): channel lane % kPiece, step lane / kPiece + 4 i (see
  // piece_part_index); otherwise step index % kPiece, channel index /
  // kPiece. Either way dD[i] and dbias[i] sum the steps t of one channel
  // with the same t % kPiece. A step's du and d(delta) replace its u and
  // step size in u_s / dt_s (no later step of the tile reads them) until the
  // tile is stored.
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOuts = kPiece * kWarpChannels;
  constexpr int kOutPerLane = (kOuts + 31) / 32;
  constexpr bool kChannelPerStep = kWarpChannels == kPiece;
  static_assert(!kChannelPerStep || kOutPerLane * 32 == kOuts, "every lane, every i");
  int out_step[kOutPerLane], out_c[kOutPerLane];
  float out_D[kOutPerLane], dD[kOutPerLane], dbias[kOutPerLane];
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    if constexpr (kChannelPerStep) {
      out_step[i] = lane_id / kPiece + (32 / kPiece) * i;
      out_c[i] = warp * kWarpChannels + lane_id % kPiece;
    } else {
      out_step[i] = lane_id % kPiece;
      out_c[i] = warp * kWarpChannels + (lane_id + 32 * i) / kPiece;
    }
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
    typename Io::template Loads<Pass::kBackward> tile;
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
    // walks them all: an exit there made the compiler spill the piece
    // starts (or copy them, guarded instead), costing full chunks more than
    // the last chunk gains.
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
      // The warps' dB / dC terms of the piece (one buffer, see
      // piece_grads_free).
      float* grads = shared.state_grads;
      float* warp_grads = grads + warp * kPiece * Tl::grad_row;
      // The piece's states.
      float hs[kPiece][kP];
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
          hs[k][i] = exp2f(lane.a[i] * dt) * prev + dtu * bv[i];
        }
      }
      piece_grads_free(s, pieces);
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
          const float decay = exp2f(lane.a[i] * dt);
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
        part_b[piece_part_index<Q>(k, lane_id)] = sum_b;
        part_a[piece_part_index<Q>(k, lane_id)] = sum_a;
      }
      // du and d(delta) of the piece's steps from the lanes' partial sums.
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kOutPerLane; ++i) {
        if (lane_id + 32 * i < kOuts) {
          const int c = out_c[i], t = s * kPiece + out_step[i];
          const int first = (c % kWarpChannels) * Q;
          // Sums from the first term (0 + x is x but for the sign of a zero,
          // which no output keeps: they are added to zeros).
          float sb, sa;
#pragma unroll
          for (int q = 0; q < Q; q += 4) {
            const int at = piece_part_index<Q>(out_step[i], first + q);
            const float4 b4 = *reinterpret_cast<const float4*>(part_b + at);
            const float4 a4 = *reinterpret_cast<const float4*>(part_a + at);
            const float b = (b4.x + b4.y) + (b4.z + b4.w);
            const float a = (a4.x + a4.y) + (a4.z + a4.w);
            sb = q == 0 ? b : sb + b;
            sa = q == 0 ? a : sa + a;
          }
          const float dt = dt_s[c * kRow + t], u = u_s[c * kRow + t];
          const float g = dy_s[c * kRow + t];
          float ddt = sb * u + sa * kLn2;
          // sigmoid(x) = 1 - e^-softplus(x)
          if (p.softplus) {
            if constexpr (Io::kBranchFreeSigmoid) {
              ddt *= sigmoid_from_softplus(dt);
            } else {
              ddt *= -expm1f(-dt);
            }
          }
          dbias[i] += ddt;
          dD[i] += g * u;
          u_s[c * kRow + t] = sb * dt + out_D[i] * g;
          dt_s[c * kRow + t] = ddt;
        }
      }
      // The block's dB / dC of the piece: every warp's terms are stored.
      __syncthreads();
      Io::store_state_grads(p, pos, l0, s * kPiece, grads, tiles, extra);
    }
    __syncthreads();
    Io::store_grads(p, pos, l0, tiles, extra);
  }
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

// Sums a step's dB and dC terms of the fragment layout (FragmentLane) over
// the warp's 8 channels: vb[e] / vc[e] are the lane's terms of state g + 8 e,
// its two channels already folded in. A butterfly over the 4 lanes that
// share the states (3 shuffles): at mask 2 the lanes with t & 2 keep the dC
// terms and pass on the dB terms (the others the reverse), at mask 1 the
// lanes with t & 1 keep state g + 8. Lane 4 g + t then holds value 16 (t /
// 2) + g + 8 (t % 2) of the step (see CrossIo::kStateGradRow), summed over
// the lanes as (t0 + t2) + (t1 + t3), and stores it at `at` (that value's
// place in the warp's row: fragment_grad_slot).
__device__ __forceinline__ int fragment_grad_slot(int lane_id) {
  const int g = lane_id / 4, t = lane_id % 4;
  return Tile<4>::states * (t >> 1) + g + 8 * (t & 1);
}
__device__ __forceinline__ void reduce_state_grads_fragment(const float (&vb)[2],
                                                            const float (&vc)[2],
                                                            float* at, int lane_id) {
  const int t = lane_id % 4;
  const bool upper2 = (t & 2) != 0, upper1 = (t & 1) != 0;
  float w[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const float send = upper2 ? vb[e] : vc[e];
    const float keep = upper2 ? vc[e] : vb[e];
    w[e] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
  }
  const float send = upper1 ? w[0] : w[1];
  const float keep = upper1 ? w[1] : w[0];
  *at = keep + __shfl_xor_sync(0xffffffffu, send, 1);
}

// One reverse-scan step's inputs in the fragment layout (scan_bwd_fragment):
// B then C of the lane's states g, g + 8 (C then B at odd steps), dy, step
// sizes and dt u of its two channels.
struct FragmentStep {
  float4 bc;
  float2 dy;
  float dt[2], dtu[2];
};

// Loads step t's inputs (bc, dy_pair: the lane's B / C float4s and dy pairs
// at step 0; dtrow, urow: its channel t rows, channel t + 4's 4 kRow on).
__device__ __forceinline__ FragmentStep load_fragment_step(const float* bc,
                                                           const float* dy_pair,
                                                           const float* dtrow,
                                                           const float* urow, int t) {
  FragmentStep in;
  in.bc = *reinterpret_cast<const float4*>(bc + t * 2 * Tile<4>::states);
  in.dy = *reinterpret_cast<const float2*>(dy_pair + t * Tile<4>::channels);
  in.dt[0] = dtrow[t];
  in.dt[1] = dtrow[4 * kRow + t];
  in.dtu[0] = in.dt[0] * urow[t];
  in.dtu[1] = in.dt[1] * urow[4 * kRow + t];
  return in;
}

// The backward in the fragment layout (Io::kFragmentBackward, CrossIo; see
// FragmentLane): the passes of scan_bwd_lanes with Q = 4, but a lane holds 2
// states of 2 channels. Its tiles are staged for it (Io::Loads<Pass::kBackward, true>:
// a lane's dy of its two channels in one 8-byte load, its B and C in one
// 16-byte load). dB / dC: the lane folds its two channels, then
// reduce_state_grads_fragment (3 shuffles a step, was 7). The sums over
// states of each (step, channel) (<dh, B> and <dh, A dA h>) go over the 8
// lanes of a channel through the warp's partial sums (one 16-byte store a
// lane and step), finished every half piece (4 steps: the partials of a half
// fill the region scan_bwd_lanes uses for 8 steps): lane 4 g + t finishes
// channel t + 4 ((g / 2) % 2) of the warp at step (g % 2) + 2 (g / 4) of each
// half, reading the 8 lanes of the channel (8-byte loads, in an order
// flipped by g % 2 so that each half warp's loads fall in distinct banks) and
// summing them as a fixed tree (the flip swaps the operands of its first
// additions). So dD[h] / dbias[h] sum the steps of one channel with the same
// t % kPiece, in the order of scan_bwd_lanes.
template <typename Io, bool kKeepDecays>
__device__ __forceinline__ void scan_bwd_fragment(const ScanParams& p) {
  using Tl = Tile<4>;
  static_assert(Io::Q == 4 && kPiece == 8 && kWarps * 8 == Tl::channels,
                "the fragment layout: 8 channels of 16 states a warp");
  constexpr int kPieces = kSteps / kPiece;
  constexpr int kHalf = kPiece / 2;
  constexpr int kStepFloats = 2 * Tl::states;  // a step of the B / C tile
  extern __shared__ float smem[];
  const Smem shared = SmemLayout<4, Pass::kBackward>::carve(smem);
  const TileSmem& tiles = shared.tile;
  float* u_s = tiles.u;
  float* dt_s = tiles.dt;
  float* dy_s = tiles.dy;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  // The partial sums of a half piece, [step][lane] float4s: <dh, B>, <dh, A
  // dA h> of channel t, then of channel t + 4.
  float* part = shared.part + warp * 2 * kPiece * 32;
  static_assert(kHalf * 32 * 4 <= 2 * kPiece * 32, "a half piece in the warp's region");
  float* extra = shared.extra;

  const BlockPos pos = block_pos(p);
  const FragmentLane lane(p, pos);
  Io::prepare(p, pos, extra);
  const SegmentRange range = segment_range(p);
  float dh[kP] = {}, decay_next[kP] = {}, dA[kP] = {};
  if (range.end < p.chunks) {
    const float* rows[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rows[h] = p.seg_state +
                ((pos.b * p.channels + lane.d[h]) * p.segments + blockIdx.y) * p.d_state;
    }
    lane.read_states(rows, p.d_state, dh);
#pragma unroll
    for (int i = 0; i < kP; ++i) decay_next[i] = 1.0f;
  }
  // The (step, channel) this lane finishes in each half piece (see above).
  const int out_k = (lane.g & 1) + 2 * (lane.g >> 2);
  const int out_c = lane.c[0] + 4 * ((lane.g >> 1) & 1);
  const int64_t out_in_group = pos.cblock * Tl::channels + out_c;
  const bool out_valid = out_in_group < p.per_group;
  const int64_t out_d = pos.g * p.per_group + (out_valid ? out_in_group : 0);
  const float out_D = p.D != nullptr ? p.D[out_d] : 0.0f;
  // Its places in the u / dt rows and the dy tile at step 0 of a half.
  const int out_at = out_c * kRow + out_k;
  const int out_dy = Io::pair_dy_index(out_c, out_k);
  const int grad_slot = fragment_grad_slot(lane_id);
  float dD[2] = {}, dbias[2] = {};
  // Its partial-sum reads: lane 4 j' + t, j' = j ^ (g % 2) for j = 0 .. 7,
  // channel slot 2 ((g / 2) % 2); even j from part_even, odd j from part_odd.
  const float* part_out = part + (out_k * 32 + lane.t) * 4 + 2 * ((lane.g >> 1) & 1);
  const float* part_even = part_out + 16 * (lane.g & 1);
  const float* part_odd = part_out + 16 - 16 * (lane.g & 1);

  Io::index_chunk(p, pos, range.end - 1, extra);
  __syncthreads();
  for (int chunk = range.end - 1; chunk >= range.first; --chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    typename Io::template Loads<Pass::kBackward, true> tile;
    tile.fetch(p, pos, l0, extra);
    __syncthreads();
    tile.stage(p, pos, l0, tiles, extra);
    // As in scan_bwd_lanes.
    if (chunk > range.first) Io::index_chunk(p, pos, chunk - 1, extra);
    __syncthreads();
    // Channel t's rows (channel t + 4's at 4 kRow on), the lane's dy pairs
    // and B / C float4s at step 0.
    const float* urow = u_s + lane.c[0] * kRow;
    const float* dtrow = dt_s + lane.c[0] * kRow;
    const float* dy_pair = dy_s + Io::pair_dy_index(lane.c[0], 0);
    const float* bc = tiles.B + 4 * lane.g;
    // As in scan_bwd_lanes, but pass 1 skips the pieces wholly past L in
    // both kernels: the one without kept decays runs stage 2 too since it
    // has 4 blocks there (R <= 28), where the last chunk (L = 196: 4 steps)
    // would walk 56 steps of nothing: about 5% of the block's instructions.
    // Its advances are skipped, not exited from: an exit made ptxas spill
    // 59 instructions a chunk (main 16), the skips 32, and a full chunk
    // comes to 7984 instructions a warp (main 8073; bwd_schedule_sass.py).
    const int64_t left = p.length - l0;
    const int pieces = left < kSteps ? static_cast<int>((left + kPiece - 1) / kPiece)
                                     : kPieces;

    // Pass 1: the state at the start of every piece.
    float start[kPieces][kP];
    {
      float h[kP] = {};
      if (chunk > 0) {
        const float* rows[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          rows[c] = p.checkpoints +
                    ((pos.b * p.channels + lane.d[c]) * p.chunks + chunk - 1) * p.d_state;
        }
        lane.read_states(rows, p.d_state, h);
      }
#pragma unroll
      for (int s = 0; s < kPieces; ++s) {
#pragma unroll
        for (int i = 0; i < kP; ++i) start[s][i] = h[i];
        if (s + 1 == kPieces) break;
        if (s + 1 >= pieces) continue;  // no later start is read
#pragma unroll
        for (int t = s * kPiece; t < (s + 1) * kPiece; ++t) {
          const float dt[2] = {dtrow[t], dtrow[4 * kRow + t]};
          const float dtu[2] = {dt[0] * urow[t], dt[1] * urow[4 * kRow + t]};
          const float2 b2 =
              *reinterpret_cast<const float2*>(bc + t * kStepFloats + 2 * (t & 1));
          const float bv[2] = {b2.x, b2.y};
#pragma unroll
          for (int i = 0; i < kP; ++i) {
            h[i] = exp2f(lane.a[i] * dt[i / 2]) * h[i] + dtu[i / 2] * bv[i % 2];
          }
        }
      }
    }

    // Pass 2: pieces in reverse; states of the piece, then the reverse scan.
#pragma unroll
    for (int s = kPieces - 1; s >= 0; --s) {
      if (s >= pieces) continue;
      // The warps' dB / dC of the piece (one buffer, see piece_grads_free).
      float* grads = shared.state_grads;
      // (this lane's value of the warp's rows)
      float* warp_grads = grads + warp * kPiece * Tl::grad_row + grad_slot;
      // The piece's states and (if kept) its decays exp2(a dt).
      float hs[kPiece][kP], decays[kKeepDecays ? kPiece : 1][kP];
#pragma unroll
      for (int k = 0; k < kPiece; ++k) {
        const int t = s * kPiece + k;
        const float dt[2] = {dtrow[t], dtrow[4 * kRow + t]};
        const float dtu[2] = {dt[0] * urow[t], dt[1] * urow[4 * kRow + t]};
        const float2 b2 =
            *reinterpret_cast<const float2*>(bc + t * kStepFloats + 2 * (t & 1));
        const float bv[2] = {b2.x, b2.y};
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          const float prev = k == 0 ? start[s][i] : hs[k - 1][i];
          const float decay = exp2f(lane.a[i] * dt[i / 2]);
          if constexpr (kKeepDecays) decays[k][i] = decay;
          hs[k][i] = decay * prev + dtu[i / 2] * bv[i % 2];
        }
      }
      // The reverse scan's schedule: the inputs of the n_ahead steps
      // scanned after step k (k - 1, k - 2) are in registers, ahead[0] the
      // next, each loaded while a step before it is scanned, ahead of that
      // step's shared stores (ptxas keeps later loads after them). Not
      // across pieces: the next piece's states come first. Without kept
      // decays, the first Io::kBwdShortPieces pieces scanned, where the
      // later pieces' starts are still live, load 1 ahead.
      constexpr int kAhead = Io::kBwdLoadsAhead;
      static_assert(kAhead >= 1, "the reverse scan loads at least 1 step ahead");
      const int n_ahead = kKeepDecays || s < kPieces - Io::kBwdShortPieces ? kAhead : 1;
      FragmentStep ahead[kAhead];
#pragma unroll
      for (int i = 0; i < kAhead; ++i) {
        if (i < n_ahead) {
          ahead[i] = load_fragment_step(bc, dy_pair, dtrow, urow, s * kPiece + kPiece - 1 - i);
        }
      }
      piece_grads_free(s, pieces);
#pragma unroll
      for (int k = kPiece - 1; k >= 0; --k) {
        const int t = s * kPiece + k;
        const FragmentStep in = ahead[0];
#pragma unroll
        for (int i = 0; i + 1 < kAhead; ++i) {
          if (i + 1 < n_ahead) ahead[i] = ahead[i + 1];
        }
        if (k >= n_ahead) {
          ahead[n_ahead - 1] = load_fragment_step(bc, dy_pair, dtrow, urow, t - n_ahead);
        }
        // B then C of states g, g + 8 (C then B at odd steps).
        const float4 v4 = in.bc;
        const float(&dt)[2] = in.dt;
        const float(&dtu)[2] = in.dtu;
        const bool odd = (t & 1) != 0;
        const float bv[2] = {odd ? v4.z : v4.x, odd ? v4.w : v4.y};
        const float cv[2] = {odd ? v4.x : v4.z, odd ? v4.y : v4.w};
        const float gy[2] = {in.dy.x, in.dy.y};
        // Per channel the sums over its two states; per state the dB / dC
        // terms of the two channels (from the first term, as in
        // scan_bwd_lanes' out sums).
        float vb[2], vc[2], sum_b[2], sum_a[2];
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          const int e = i % 2, h = i / 2;
          float decay;
          if constexpr (kKeepDecays) {
            decay = decays[k][i];
          } else {
            decay = exp2f(lane.a[i] * dt[h]);
          }
          dh[i] = gy[h] * cv[e] + decay_next[i] * dh[i];
          decay_next[i] = decay;
          const float prev = k == 0 ? start[s][i] : hs[k - 1][i];
          const float w = dh[i] * decay * prev;  // dh_l dA_l h_{l-1}
          dA[i] += dt[h] * w;
          sum_a[h] = e == 0 ? lane.a[i] * w : sum_a[h] + lane.a[i] * w;
          sum_b[h] = e == 0 ? dh[i] * bv[e] : sum_b[h] + dh[i] * bv[e];
          vb[e] = h == 0 ? dh[i] * dtu[0] : vb[e] + dh[i] * dtu[1];
          vc[e] = h == 0 ? gy[0] * hs[k][i] : vc[e] + gy[1] * hs[k][i];
        }
        reduce_state_grads_fragment(vb, vc, warp_grads + k * Tl::grad_row, lane_id);
        *reinterpret_cast<float4*>(part + ((k % kHalf) * 32 + lane_id) * 4) =
            make_float4(sum_b[0], sum_a[0], sum_b[1], sum_a[1]);
        if (k % kHalf != 0) continue;
        // du and d(delta) of the half's steps k .. k + 3.
        __syncwarp();
        {
          float2 v[8];
#pragma unroll
          for (int j = 0; j < 8; j += 2) {
            v[j] = *reinterpret_cast<const float2*>(part_even + 16 * j);
            v[j + 1] = *reinterpret_cast<const float2*>(part_odd + 16 * j);
          }
          const float sb = ((v[0].x + v[1].x) + (v[2].x + v[3].x)) +
                           ((v[4].x + v[5].x) + (v[6].x + v[7].x));
          const float sa = ((v[0].y + v[1].y) + (v[2].y + v[3].y)) +
                           ((v[4].y + v[5].y) + (v[6].y + v[7].y));
          const int at = out_at + t;
          const float dt = dt_s[at], u = u_s[at];
          const float g = dy_s[out_dy + t * Tl::channels];
          float ddt = sb * u + sa * kLn2;
          // sigmoid(x) = 1 - e^-softplus(x)
          if (p.softplus) {
            if constexpr (Io::kBranchFreeSigmoid) {
              ddt *= sigmoid_from_softplus(dt);
            } else {
              ddt *= -expm1f(-dt);
            }
          }
          dbias[k / kHalf] += ddt;
          dD[k / kHalf] += g * u;
          u_s[at] = sb * dt + out_D * g;
          dt_s[at] = ddt;
        }
        // (the first half's reads before the second half's stores)
        if (k != 0) __syncwarp();
      }
      // The block's dB / dC of the piece: every warp's terms are stored.
      __syncthreads();
      Io::store_state_grads(p, pos, l0, s * kPiece, grads, tiles, extra);
    }
    __syncthreads();
    Io::store_grads(p, pos, l0, tiles, extra);
  }
#pragma unroll
  for (int i = 0; i < kP; ++i) {
    const int n = lane.state(i);
    if (lane.valid[i / 2] && n < p.d_state) {
      atomicAdd(p.dA + lane.d[i / 2] * p.d_state + n, dA[i]);
    }
  }
  if (out_valid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      atomicAdd(p.dD + out_d, dD[i]);
      atomicAdd(p.ddelta_bias + out_d, dbias[i]);
    }
  }
}

// kKeepDecays: a piece's decays exp2(a dt), computed for its states, are
// kept in registers for its reverse scan (one exponential per state and
// step fewer, 32 registers more, so 3 blocks per SM): the launch code takes
// it where shared memory allows no more blocks anyway. An Io with
// kFragmentBackward runs scan_bwd_fragment, the others scan_bwd_lanes.
template <typename Io, bool kKeepDecays>
__global__ void __launch_bounds__(kThreads, kKeepDecays
                                                ? Tile<Io::Q>::bwd_keep_blocks_per_sm
                                                : Tile<Io::Q>::bwd_blocks_per_sm)
    scan_bwd_kernel(const ScanParams p) {
  if constexpr (Io::kFragmentBackward) {
    scan_bwd_fragment<Io, kKeepDecays>(p);
  } else {
    static_assert(!kKeepDecays, "only the fragment layout keeps decays");
    scan_bwd_lanes<Io>(p);
  }
}

// Backward: segments 1 .. S-1 (blockIdx.y + 1), chunks and steps in
// reverse, to seg_state / seg_dt.
template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::bwd_summary_blocks_per_sm)
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
  typename Io::template Loads<Pass::kBackwardSummary> tile;
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
