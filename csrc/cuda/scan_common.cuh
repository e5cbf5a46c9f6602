// Device helpers shared by the CUDA selective scans (csrc/cuda/*.cu): the
// block shape, the kernel parameters, the shared-memory layout, a lane's
// channel and states, segments.
//
// Layout: Q lanes of a warp share one channel (a (batch, channel) row), each
// lane holding P = 4 of its N <= 4Q states in registers (Q = 4 for N <= 16,
// Q = 16 for N <= 64). A block of 128 threads runs 128 / Q channels of one
// group, so the group's B and C serve all of them. Time is walked in tiles
// of kChunk = 64 steps staged through shared memory (the next tile's loads
// in flight during the forward's scan). Each lane scans its states
// sequentially; sums over a channel's lanes (y, and the backward's <dh, B>
// and <dh, A dA h>) go through a small per-warp buffer and are finished
// every few steps, off the scan's dependency chain. Per-step outputs are
// gathered in shared memory and written once per tile.
//
// The kernels (scan_fwd.cuh, scan_bwd.cuh) are written once and read / write
// their tensors through an "Io" policy, one per layout: SeqIo
// (seq_layout.cuh), the plain op's (batch, channels, L) rows, and CrossIo
// (cross_layout.cuh), SS2D's four scan orders of one channels-last map.
// scan_launch.cuh launches them; selective_scan.cu and cross_scan.cu hold
// the host wrappers of the two op families.
#pragma once

#include <cstdint>

#include "../scan.h"

namespace mmvmamba {
namespace scan_cuda {

constexpr int kThreads = 128;
constexpr int kP = 4;             // states per lane
constexpr int kSteps = kChunk;    // time steps per tile (= checkpoint chunk)
constexpr int kRow = kSteps + 1;  // padded row of a per-channel tile
constexpr int kPiece = 8;         // backward recompute piece
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int Q>
struct Tile {
  // Resident blocks per SM the register budgets are set for; the backward
  // that keeps a piece's decays in registers (scan_bwd.cuh) is set for 3.
  static constexpr int fwd_blocks_per_sm = Q == 4 ? 5 : 4;
  static constexpr int bwd_blocks_per_sm = Q == 4 ? 4 : 3;
  static constexpr int bwd_keep_blocks_per_sm = 3;
  // The forward with its step sizes on the tensor cores (scan_fwd_kernel,
  // kTensorSteps; where tensor_step_sizes in scan_launch.cuh chooses it):
  // 128 registers.
  static constexpr int fwd_tensor_blocks_per_sm = 4;
  // The backward's segment summary carries dh alone (no states, no
  // outputs) and runs more blocks: with its trimmed staging (Staged), 3-14%
  // faster at 7 than before at 4 on an H200. The forward's summary at 7 was
  // slower than at 5 (docs/scan_kernel_notes.md).
  static constexpr int bwd_summary_blocks_per_sm = Q == 4 ? 7 : 3;
  static constexpr int channels = kThreads / Q;  // channels per block
  static constexpr int states = kP * Q;          // states held by a channel
  static constexpr int state_row = states;       // 16-byte rows
  // A warp's dB and dC terms of one step: states each, padded so that 8
  // steps x 4 values fall in distinct banks (row = 4 mod 32 words).
  static constexpr int grad_row = 2 * states + 4;
};

constexpr int kWarps = kThreads / 32;

struct ScanParams {
  const void *u, *delta, *B, *C, *dy;
  const float *A, *D, *delta_bias;
  void *y, *du, *ddelta;
  float *checkpoints, *dA, *dB, *dC, *dD, *ddelta_bias;
  int64_t batch, channels, length, groups, per_group, d_state, chunks;
  int channel_blocks;
  bool softplus;
  // The sequence's segments (blockIdx.y): seg_chunks chunks each, the last
  // one shorter. With segments > 1, seg_state (batch, channels, segments,
  // N) and seg_dt (batch, channels, segments) hold the segments' summaries,
  // then the carries entering them (see scan_carry_kernel).
  int seg_chunks, segments;
  float *seg_state, *seg_dt;
  // CrossIo only: x_dbl (in `delta`), dt_weight (4, D, R), their gradients.
  float *dx_dbl, *ddt_weight;
  const float* dt_weight;
  int height, width, rank, row_stride, dt_pitch;  // row_stride = 4 (R + 2N)
  float inv_height;
  // CrossIo only: bytes of one position in the (batch, L, D) maps and in the
  // rows of x_dbl, for elements of 2 bytes ([0]) and 4 bytes ([1]).
  int map_bytes[2], row_bytes[2];
};

struct BlockPos {
  int64_t b, g, cblock;  // batch, group, block of channels within the group
};

__device__ __forceinline__ BlockPos block_pos(const ScanParams& p) {
  const int64_t blk = blockIdx.x;
  BlockPos pos;
  pos.cblock = blk % p.channel_blocks;
  pos.g = (blk / p.channel_blocks) % p.groups;
  pos.b = blk / (static_cast<int64_t>(p.channel_blocks) * p.groups);
  return pos;
}

// softplus as torch computes it (x above 20 passes through), branch-free:
// log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, for e = exp(-|x|).
__device__ __forceinline__ float softplus(float x) {
  const float e = __expf(-fabsf(x));
  const float s = __fdividef(e, 2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = fmaf(p, s2, 1.0f / 11.0f);
  p = fmaf(p, s2, 1.0f / 9.0f);
  p = fmaf(p, s2, 1.0f / 7.0f);
  p = fmaf(p, s2, 1.0f / 5.0f);
  p = fmaf(p, s2, 1.0f / 3.0f);
  p = fmaf(p, s2, 1.0f);
  const float sp = fmaxf(x, 0.0f) + 2.0f * s * p;
  return x > 20.0f ? x : sp;
}

// softplus' derivative sigmoid(x) from the step size dt = softplus(x) >= 0:
// 1 - e^-dt, branch-free (13 SASS instructions, against 26 for
// -expm1f(-dt)). Below 1: dt + dt^2 h(dt), h a degree-5 fit of (e^-dt - 1 +
// dt) / dt^2 on [0, 1] (relative error of the fit 2e-9; 1.2 ulp at most in
// float32, by exhaustive check). From 1 on: 1 - 2^(-dt log2 e), where the
// exponential's relative error (ex2.approx, 2 ulp) reaches the result
// scaled by e^-dt / (1 - e^-dt) <= 0.58: 2.5 ulp at most, 1 ulp from dt =
// 1.4 (see docs/scan_kernel_notes.md, plan step 2). 1 for dt above 17, as
// expm1f gives.
__device__ __forceinline__ float sigmoid_from_softplus(float dt) {
  float h = 0x1.0eceaap-13f;
  h = fmaf(h, dt, -0x1.55152p-10f);
  h = fmaf(h, dt, 0x1.0f31ep-7f);
  h = fmaf(h, dt, -0x1.552d12p-5f);
  h = fmaf(h, dt, 0x1.5553c2p-3f);
  h = fmaf(h, dt, -0x1.fffff6p-2f);
  const float small = fmaf(h * dt, dt, dt);
  const float large = 1.0f - exp2f(dt * -0x1.715476p+0f);
  return dt < 1.0f ? small : large;
}

// Per-warp scratch of the lanes' partial sums, kPart steps deep: the scan
// writes one value per lane and step, and every kPart steps the warp sums
// them over each channel's Q lanes (no shuffles on the scan's path).
constexpr int kPart = 16;

// Index of (step, lane) in such a scratch: rows of 32 lanes, swizzled by
// step so that the float4 reads of 8 steps by a quarter warp (one channel's
// lanes each) fall in different banks.
__device__ __forceinline__ int part_index(int step, int lane) {
  return step * 32 + (lane ^ ((step & 7) << 2));
}

// The kernels of a scan; each lays out its shared memory differently.
enum class Pass { kForward, kBackward, kForwardSummary, kBackwardSummary };

// The tiles a pass stages: the full passes all they read or store through
// (and, CrossIo, the scanned chunk's positions for the stores); a summary
// only what its walk reads: forward u, the step sizes and B; backward the
// step sizes, dy and C.
template <Pass kPass>
struct Staged {
  static constexpr bool kFull = kPass == Pass::kForward || kPass == Pass::kBackward;
  static constexpr bool u = kPass != Pass::kBackwardSummary;
  static constexpr bool dy = kPass == Pass::kBackward || kPass == Pass::kBackwardSummary;
  static constexpr bool B = kPass != Pass::kBackwardSummary;
  static constexpr bool C = kPass != Pass::kForwardSummary;
};

// The shared-memory tiles of a block, kSteps steps deep: per channel (rows
// of kRow) u, step sizes and dy; per step (rows of state_row) B and C.
struct TileSmem {
  float *u, *dt, *dy, *B, *C;
};

// A block's shared memory, carved by SmemLayout: the tiles, the backward's
// per-warp dB / dC terms of a piece ([warp][kPiece steps][grad_row]), the
// lanes' partial sums (per warp; kPart steps forward, two buffers of kPiece
// steps backward) and the Io's extra floats. Regions a pass does not use
// are null.
struct Smem {
  TileSmem tile;
  float *state_grads, *part, *extra;
};

// The one layout of a block's shared memory, in floats: the tiles the pass
// stages (Staged), then for the full passes the backward's dB / dC terms and
// the partial sums, then the Io's extra floats, whose count is known only at
// run time and so come last. Kernels carve their pointers with carve(), the
// launch code sizes the allocation with bytes().
template <int Q, Pass kPass>
struct SmemLayout {
  using Tl = Tile<Q>;
  using In = Staged<kPass>;
  static constexpr int kChannelTile = Tl::channels * kRow;
  static constexpr int kStateTile = kSteps * Tl::state_row;
  static constexpr int kGradFloats =
      kPass == Pass::kBackward ? kWarps * kPiece * Tl::grad_row : 0;
  static constexpr int kPartFloats = kPass == Pass::kForward    ? kThreads * kPart
                                     : kPass == Pass::kBackward ? 2 * kThreads * kPiece
                                                                : 0;
  static constexpr int u = 0;
  static constexpr int dt = u + (In::u ? kChannelTile : 0);
  static constexpr int dy = dt + kChannelTile;
  static constexpr int B = dy + (In::dy ? kChannelTile : 0);
  static constexpr int C = B + (In::B ? kStateTile : 0);
  static constexpr int state_grads = C + (In::C ? kStateTile : 0);
  static constexpr int part = state_grads + kGradFloats;
  static constexpr int extra = part + kPartFloats;
  static_assert(dt % 4 == 0 && dy % 4 == 0 && B % 4 == 0 && C % 4 == 0 &&
                    state_grads % 4 == 0 && part % 4 == 0 && extra % 4 == 0,
                "regions read as float4 start on 16-byte boundaries");

  static int bytes(int extra_floats) {
    return (extra + extra_floats) * static_cast<int>(sizeof(float));
  }

  __device__ static Smem carve(float* smem) {
    Smem s;
    s.tile.u = In::u ? smem + u : nullptr;
    s.tile.dt = smem + dt;
    s.tile.dy = In::dy ? smem + dy : nullptr;
    s.tile.B = In::B ? smem + B : nullptr;
    s.tile.C = In::C ? smem + C : nullptr;
    s.state_grads = kGradFloats > 0 ? smem + state_grads : nullptr;
    s.part = kPartFloats > 0 ? smem + part : nullptr;
    s.extra = smem + extra;
    return s;
  }
};

// The block's sum of the warps' dB / dC term j (dB terms of the states, then
// dC terms) of step t of a backward piece; `grads` holds [warp][kPiece]
// rows of grad_row floats (see reduce_state_grads in scan_bwd.cuh).
// The sum starts from the first warp's term (0 + x is x but for the sign of
// a zero; the sums are added to zeros).
template <int Q>
__device__ __forceinline__ float sum_state_grad(const float* grads, int t, int j) {
  float sum = grads[t * Tile<Q>::grad_row + j];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) sum += grads[(w * kPiece + t) * Tile<Q>::grad_row + j];
  return sum;
}

// The lane's channel and its A (scaled by log2 e; zero for padding).
template <int Q>
struct Lane {
  int q, c;           // state quarter, channel within the block
  int64_t d;          // channel index
  bool valid;
  float a[kP];        // A * log2(e)

  __device__ Lane(const ScanParams& p, const BlockPos& pos) {
    q = threadIdx.x % Q;
    c = threadIdx.x / Q;
    const int64_t d_in_group = pos.cblock * Tile<Q>::channels + c;
    valid = d_in_group < p.per_group;
    d = pos.g * p.per_group + (valid ? d_in_group : 0);
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int n = q * kP + i;
      a[i] = valid && n < p.d_state ? p.A[d * p.d_state + n] * kLog2e : 0.0f;
    }
  }

  __device__ float* checkpoint(const ScanParams& p, int64_t b, int64_t chunk) const {
    return p.checkpoints + ((b * p.channels + d) * p.chunks + chunk) * p.d_state;
  }

  // The row's states in seg_state of segment `seg`.
  __device__ float* segment_state(const ScanParams& p, int64_t b, int seg) const {
    return p.seg_state + ((b * p.channels + d) * p.segments + seg) * p.d_state;
  }

  // Reads (into v) the lane's states of an (N,) row; zero for padding.
  __device__ void read_states(const float* row, int d_state, float (&v)[kP]) const {
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      v[i] = valid && q * kP + i < d_state ? row[q * kP + i] : 0.0f;
    }
  }

  __device__ void write_states(float* row, int d_state, const float (&v)[kP]) const {
    if (!valid) return;
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      if (q * kP + i < d_state) row[q * kP + i] = v[i];
    }
  }
};

// The backward's fragment layout (Q = 4, CrossIo): lane 4 g + t of warp w
// holds states g and g + 8 of the warp's channels t and t + 4 (block
// channels 8 w + t, 8 w + t + 4), the A fragment of mma.m16n8k8 with the
// states as rows and the channels as columns. Pair i: state g + 8 (i % 2)
// of channel t + 4 (i / 2); still kP pairs a lane, a warp 8 channels x 16
// states. A (scaled by log2 e) is zero for padding states and channels.
struct FragmentLane {
  static constexpr int kChannels = Tile<4>::channels;
  int g, t;
  int c[2];        // channels within the block
  int64_t d[2];    // channel indices
  bool valid[2];
  float a[kP];     // A * log2(e) of the pairs

  __device__ FragmentLane(const ScanParams& p, const BlockPos& pos) {
    const int lane = threadIdx.x % 32;
    g = lane / 4;
    t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      c[h] = threadIdx.x / 32 * 8 + t + 4 * h;
      const int64_t d_in_group = pos.cblock * kChannels + c[h];
      valid[h] = d_in_group < p.per_group;
      d[h] = pos.g * p.per_group + (valid[h] ? d_in_group : 0);
    }
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int n = state(i);
      a[i] = valid[i / 2] && n < p.d_state ? p.A[d[i / 2] * p.d_state + n] * kLog2e : 0.0f;
    }
  }

  __device__ int state(int i) const { return g + 8 * (i % 2); }

  // Reads (into v) the pairs' states of the channels' (N,) rows at `rows`
  // (row h of channel h); zero for padding.
  __device__ void read_states(const float* const (&rows)[2], int d_state,
                              float (&v)[kP]) const {
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      v[i] = valid[i / 2] && state(i) < d_state ? rows[i / 2][state(i)] : 0.0f;
    }
  }
};

// The chunks [first, end) of the block's segment (blockIdx.y + offset).
struct SegmentRange {
  int first, end;
};

__device__ __forceinline__ SegmentRange segment_range(const ScanParams& p,
                                                      int offset = 0) {
  SegmentRange r;
  r.first = (static_cast<int>(blockIdx.y) + offset) * p.seg_chunks;
  r.end = min(r.first + p.seg_chunks, static_cast<int>(p.chunks));
  return r;
}

}  // namespace scan_cuda
}  // namespace mmvmamba
