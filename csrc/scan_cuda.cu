// CUDA implementation of mmvmamba::selective_scan_fwd / _bwd.
//
// Layout: Q lanes of a warp share one channel (a (batch, channel) row), each
// lane holding P = 4 of its N <= 4Q states in registers (Q = 4 for N <= 16,
// Q = 16 for N <= 64). A block of 128 threads runs 128 / Q channels of one
// group, so the group's B and C serve all of them. Time is walked in tiles
// of kChunk = 64 steps staged through shared memory (loads coalesced along
// L, the next tile's loads in flight during the forward's scan). Each lane
// scans its states sequentially; sums over a channel's lanes (y, and the
// backward's <dh, B> and <dh, A dA h>) go through a small per-warp buffer
// and are finished every few steps, off the scan's dependency chain.
//
// The forward saves every row's state at the end of each chunk. The backward
// walks the chunks in reverse: it restarts from the saved state, recomputes
// the chunk forward keeping the state every 8 steps in registers, then for
// each 8-step piece recomputes its states (registers) and runs the reverse
// scan. dB / dC are summed over the warp's channels by a butterfly of
// shuffles, over the block in shared memory, and over blocks by float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "scan.h"

namespace mmvmamba {
namespace {

constexpr int kThreads = 128;
constexpr int kP = 4;             // states per lane
constexpr int kSteps = kChunk;    // time steps per tile (= checkpoint chunk)
constexpr int kRow = kSteps + 1;  // padded row of a per-channel tile
constexpr int kPiece = 8;         // backward recompute piece
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int Q>
struct Tile {
  // Resident blocks per SM the register budgets are set for.
  static constexpr int fwd_blocks_per_sm = Q == 4 ? 5 : 4;
  static constexpr int bwd_blocks_per_sm = Q == 4 ? 4 : 3;
  static constexpr int channels = kThreads / Q;  // channels per block
  static constexpr int states = kP * Q;          // states held by a channel
  static constexpr int state_row = states + 4;   // padded (keeps 16-byte rows)
};

struct ScanParams {
  const void *u, *delta, *B, *C, *dy;
  const float *A, *D, *delta_bias;
  void *y, *du, *ddelta;
  float *checkpoints, *dA, *dB, *dC, *dD, *ddelta_bias;
  int64_t batch, channels, length, groups, per_group, d_state, chunks;
  int channel_blocks;
  bool softplus;
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

// One tile's loads for a block: u, delta (and dy) of its channels for steps
// [l0, l0 + kSteps), and the group's B and C. fetch() issues every load at
// once into registers; stage() converts them and stores them in shared memory
// (step sizes after bias and softplus; B, C as [step][state]). Entries past
// L, past the group or past N are zero, and a zero step is the identity.
// A row (channel or state) is read by kThreads / rows threads, thread j of
// them taking steps j, j + R, j + 2R, ...: one base address per row.
template <typename T, int Q, bool kWithDy>
struct TileLoad {
  using Tl = Tile<Q>;
  static constexpr int kRowThreads = kThreads / Tl::channels;
  static constexpr int kRowLoads = kSteps / kRowThreads;
  static constexpr int kStateThreads = kThreads / Tl::states;
  static constexpr int kStateLoads = kSteps / kStateThreads;
  T u[kRowLoads], delta[kRowLoads], dy[kWithDy ? kRowLoads : 1];
  T B[kStateLoads], C[kStateLoads];

  __device__ void fetch(const ScanParams& p, const BlockPos& pos, int64_t l0) {
    const T zero = T(0.0f);
    {
      const int c = threadIdx.x / kRowThreads;
      const int64_t l = l0 + threadIdx.x % kRowThreads;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      const bool row_ok = d_in_group < p.per_group;
      const int64_t at =
          (pos.b * p.channels + pos.g * p.per_group + (row_ok ? d_in_group : 0)) *
              p.length + l;
      const T* u_row = static_cast<const T*>(p.u) + at;
      const T* delta_row = static_cast<const T*>(p.delta) + at;
      const T* dy_row = static_cast<const T*>(p.dy) + at;
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) {
        const bool ok = row_ok && l + k * kRowThreads < p.length;
        u[k] = ok ? u_row[k * kRowThreads] : zero;
        delta[k] = ok ? delta_row[k * kRowThreads] : zero;
        if constexpr (kWithDy) dy[k] = ok ? dy_row[k * kRowThreads] : zero;
      }
    }
    const int n = threadIdx.x / kStateThreads;
    const int64_t l = l0 + threadIdx.x % kStateThreads;
    const bool row_ok = n < p.d_state;
    const int64_t at =
        ((pos.b * p.groups + pos.g) * p.d_state + (row_ok ? n : 0)) * p.length + l;
    const T* B_row = static_cast<const T*>(p.B) + at;
    const T* C_row = static_cast<const T*>(p.C) + at;
#pragma unroll
    for (int k = 0; k < kStateLoads; ++k) {
      const bool ok = row_ok && l + k * kStateThreads < p.length;
      B[k] = ok ? B_row[k * kStateThreads] : zero;
      C[k] = ok ? C_row[k * kStateThreads] : zero;
    }
  }

  __device__ void stage(const ScanParams& p, const BlockPos& pos, int64_t l0,
                        float* u_s, float* dt_s, float* dy_s, float* B_s,
                        float* C_s) const {
    {
      const int c = threadIdx.x / kRowThreads;
      const int j = threadIdx.x % kRowThreads;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      const bool row_ok = d_in_group < p.per_group;
      const float bias = p.delta_bias != nullptr && row_ok
                             ? p.delta_bias[pos.g * p.per_group + d_in_group]
                             : 0.0f;
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) {
        const int t = j + k * kRowThreads;
        // Padding keeps a zero step: no bias, no softplus.
        const float x = static_cast<float>(delta[k]) + bias;
        const float dt = p.softplus ? softplus(x) : x;
        u_s[c * kRow + t] = static_cast<float>(u[k]);
        dt_s[c * kRow + t] = row_ok && l0 + t < p.length ? dt : 0.0f;
        if constexpr (kWithDy) dy_s[c * kRow + t] = static_cast<float>(dy[k]);
      }
    }
    const int n = threadIdx.x / kStateThreads;
    const int j = threadIdx.x % kStateThreads;
#pragma unroll
    for (int k = 0; k < kStateLoads; ++k) {
      const int t = j + k * kStateThreads;
      B_s[t * Tl::state_row + n] = static_cast<float>(B[k]);
      C_s[t * Tl::state_row + n] = static_cast<float>(C[k]);
    }
  }
};

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
};

// Per-warp scratch of the lanes' partial sums, kPart steps deep: the scan
// writes one value per lane and step, and every kPart steps the warp sums
// them over each channel's Q lanes (no shuffles on the scan's path).
constexpr int kPart = 16;

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads, Tile<Q>::fwd_blocks_per_sm)
    scan_fwd_kernel(const ScanParams p) {
  using Tl = Tile<Q>;
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOutPerLane = kWarpChannels * kPart / 32;
  extern __shared__ float smem[];
  float* u_s = smem;
  float* dt_s = u_s + Tl::channels * kRow;
  float* B_s = dt_s + Tl::channels * kRow;
  float* C_s = B_s + kSteps * Tl::state_row;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  float* part = C_s + kSteps * Tl::state_row + warp * kPart * 32;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  float h[kP] = {};
  // The outputs this lane sums: step lane % kPart of channels
  // lane / kPart + 2 i of the warp.
  const int out_step = lane_id % kPart;
  int out_c[kOutPerLane];
  float out_D[kOutPerLane];
  T* out_row[kOutPerLane];
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    out_c[i] = warp * kWarpChannels + lane_id / kPart + 2 * i;
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    const bool ok = d_in_group < p.per_group;
    const int64_t d = pos.g * p.per_group + (ok ? d_in_group : 0);
    out_D[i] = p.D != nullptr ? p.D[d] : 0.0f;
    out_row[i] = ok ? static_cast<T*>(p.y) + (pos.b * p.channels + d) * p.length
                    : nullptr;
  }

  TileLoad<T, Q, false> tile;
  tile.fetch(p, pos, 0);
  for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
    const int64_t l0 = chunk * kSteps;
    const int steps = p.length - l0 < kSteps ? static_cast<int>(p.length - l0) : kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, u_s, dt_s, nullptr, B_s, C_s);
    __syncthreads();
    // The next tile's loads fly while this one is scanned.
    if (chunk + 1 < p.chunks) tile.fetch(p, pos, l0 + kSteps);
    for (int t0 = 0; t0 < steps; t0 += kPart) {
      const int piece = steps - t0 < kPart ? steps - t0 : kPart;
#pragma unroll 4
      for (int k = 0; k < piece; ++k) {
        const int t = t0 + k;
        const float dt = dt_s[lane.c * kRow + t];
        const float dtu = dt * u_s[lane.c * kRow + t];
        const float4 b4 = *reinterpret_cast<const float4*>(
            B_s + t * Tl::state_row + lane.q * kP);
        const float4 c4 = *reinterpret_cast<const float4*>(
            C_s + t * Tl::state_row + lane.q * kP);
        const float bv[kP] = {b4.x, b4.y, b4.z, b4.w};
        const float cv[kP] = {c4.x, c4.y, c4.z, c4.w};
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          h[i] = exp2f(lane.a[i] * dt) * h[i] + dtu * bv[i];
          acc += cv[i] * h[i];
        }
        part[k * 32 + lane_id] = acc;
      }
      __syncwarp();
      if (out_step < piece) {
        const int t = t0 + out_step;
#pragma unroll
        for (int i = 0; i < kOutPerLane; ++i) {
          const float* lanes = part + out_step * 32 + (out_c[i] % kWarpChannels) * Q;
          float y = 0.0f;
#pragma unroll
          for (int q = 0; q < Q; q += 4) {
            const float4 v = *reinterpret_cast<const float4*>(lanes + q);
            y += (v.x + v.y) + (v.z + v.w);
          }
          y += out_D[i] * u_s[out_c[i] * kRow + t];
          if (out_row[i] != nullptr) out_row[i][l0 + t] = static_cast<T>(y);
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
  }
}

// Sums vb (dB terms) and vc (dC terms) of the lanes holding the same states
// over the warp's channels: a butterfly that halves the values each stage.
// Afterwards the lane holds values [k*V, (k+1)*V) of the 2*kP, with k its
// channel within the warp and V = 2*kP*Q/32; it adds them to dB_s / dC_s.
template <int Q>
__device__ __forceinline__ void reduce_state_grads(const float (&vb)[kP],
                                                   const float (&vc)[kP],
                                                   float* dB_row, float* dC_row,
                                                   int q) {
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
  const int base = (lane_id / Q) * kKept;
#pragma unroll
  for (int j = 0; j < kKept; ++j) {
    const int idx = base + j;
    if (idx < kP) {
      atomicAdd(dB_row + q * kP + idx, v[j]);
    } else {
      atomicAdd(dC_row + q * kP + idx - kP, v[j]);
    }
  }
}

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads, Tile<Q>::bwd_blocks_per_sm)
    scan_bwd_kernel(const ScanParams p) {
  using Tl = Tile<Q>;
  constexpr int kPieces = kSteps / kPiece;
  extern __shared__ float smem[];
  float* u_s = smem;
  float* dt_s = u_s + Tl::channels * kRow;
  float* dy_s = dt_s + Tl::channels * kRow;
  float* B_s = dy_s + Tl::channels * kRow;
  float* C_s = B_s + kSteps * Tl::state_row;
  float* dB_s = C_s + kSteps * Tl::state_row;
  float* dC_s = dB_s + kSteps * Tl::states;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  float* part_b = dC_s + kSteps * Tl::states + warp * 2 * kPiece * 32;
  float* part_a = part_b + kPiece * 32;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  for (int i = threadIdx.x; i < 2 * kSteps * Tl::states; i += kThreads) {
    dB_s[i] = 0.0f;
  }
  float dh[kP] = {}, decay_next[kP] = {}, dA[kP] = {};
  // The (step, channel) outputs this lane finishes for each piece: index
  // lane + 32 i of the warp's kPiece x kWarpChannels, step = index % kPiece.
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOuts = kPiece * kWarpChannels;
  constexpr int kOutPerLane = (kOuts + 31) / 32;
  const int out_step = lane_id % kPiece;
  int out_c[kOutPerLane];
  float out_D[kOutPerLane], dD[kOutPerLane], dbias[kOutPerLane];
  T *du_row[kOutPerLane], *dd_row[kOutPerLane];  // null for padding channels
#pragma unroll
  for (int i = 0; i < kOutPerLane; ++i) {
    out_c[i] = warp * kWarpChannels + (lane_id + 32 * i) / kPiece;
    const int64_t d_in_group = pos.cblock * Tl::channels + out_c[i];
    const bool ok = d_in_group < p.per_group && lane_id + 32 * i < kOuts;
    const int64_t d = pos.g * p.per_group + (ok ? d_in_group : 0);
    out_D[i] = p.D != nullptr ? p.D[d] : 0.0f;
    const int64_t row = (pos.b * p.channels + d) * p.length;
    du_row[i] = ok ? static_cast<T*>(p.du) + row : nullptr;
    dd_row[i] = ok ? static_cast<T*>(p.ddelta) + row : nullptr;
    dD[i] = dbias[i] = 0.0f;
  }

  for (int64_t chunk = p.chunks - 1; chunk >= 0; --chunk) {
    const int64_t l0 = chunk * kSteps;
    TileLoad<T, Q, true> tile;
    tile.fetch(p, pos, l0);
    __syncthreads();
    tile.stage(p, pos, l0, u_s, dt_s, dy_s, B_s, C_s);
    __syncthreads();
    const float* urow = u_s + lane.c * kRow;
    const float* dtrow = dt_s + lane.c * kRow;
    const float* dyrow = dy_s + lane.c * kRow;

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
        reduce_state_grads<Q>(vb, vc, dB_s + t * Tl::states,
                              dC_s + t * Tl::states, lane.q);
        part_b[k * 32 + lane_id] = sum_b;
        part_a[k * 32 + lane_id] = sum_a;
      }
      // du and d(delta) of the piece's steps from the lanes' partial sums.
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kOutPerLane; ++i) {
        if (lane_id + 32 * i < kOuts) {
          const int c = out_c[i], t = s * kPiece + out_step;
          const int at = out_step * 32 + (c % kWarpChannels) * Q;
          float sb = 0.0f, sa = 0.0f;
#pragma unroll
          for (int q = 0; q < Q; q += 4) {
            const float4 b4 = *reinterpret_cast<const float4*>(part_b + at + q);
            const float4 a4 = *reinterpret_cast<const float4*>(part_a + at + q);
            sb += (b4.x + b4.y) + (b4.z + b4.w);
            sa += (a4.x + a4.y) + (a4.z + a4.w);
          }
          const float dt = dt_s[c * kRow + t], u = u_s[c * kRow + t];
          const float g = dy_s[c * kRow + t];
          float ddt = sb * u + sa * kLn2;
          if (p.softplus) ddt *= -expm1f(-dt);  // sigmoid(x) = 1 - e^-softplus(x)
          dbias[i] += ddt;
          dD[i] += g * u;
          if (du_row[i] != nullptr && l0 + t < p.length) {
            du_row[i][l0 + t] = static_cast<T>(sb * dt + out_D[i] * g);
            dd_row[i][l0 + t] = static_cast<T>(ddt);
          }
        }
      }
      __syncwarp();
    }
    __syncthreads();

    const int64_t bc = (pos.b * p.groups + pos.g) * p.d_state;
    for (int i = threadIdx.x; i < Tl::states * kSteps; i += kThreads) {
      const int n = i / kSteps, t = i % kSteps;
      const int64_t l = l0 + t;
      if (n < p.d_state && l < p.length) {
        atomicAdd(p.dB + (bc + n) * p.length + l, dB_s[t * Tl::states + n]);
        atomicAdd(p.dC + (bc + n) * p.length + l, dC_s[t * Tl::states + n]);
      }
      dB_s[t * Tl::states + n] = 0.0f;
      dC_s[t * Tl::states + n] = 0.0f;
    }
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

template <int Q>
int shared_bytes(bool backward) {
  using Tl = Tile<Q>;
  int floats = 2 * kSteps * Tl::state_row;
  if (backward) {
    floats += 3 * Tl::channels * kRow + 2 * kSteps * Tl::states +
              2 * kThreads * kPiece;
  } else {
    floats += 2 * Tl::channels * kRow + kThreads * kPart;
  }
  return floats * static_cast<int>(sizeof(float));
}

template <typename T, int Q>
void launch(const ScanParams& p, bool backward) {
  const int64_t blocks = p.batch * p.groups * p.channel_blocks;
  TORCH_CHECK(blocks <= INT32_MAX, "selective_scan: batch x channels too "
              "large for one launch (", std::to_string(blocks), " blocks)");
  const int smem = shared_bytes<Q>(backward);
  auto kernel = backward ? scan_bwd_kernel<T, Q> : scan_fwd_kernel<T, Q>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem,
           c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_state(ScanParams& p, bool backward) {
  if (p.d_state <= 16) {
    p.channel_blocks = static_cast<int>((p.per_group + Tile<4>::channels - 1) /
                                        Tile<4>::channels);
    launch<T, 4>(p, backward);
  } else {
    p.channel_blocks = static_cast<int>(
        (p.per_group + Tile<16>::channels - 1) / Tile<16>::channels);
    launch<T, 16>(p, backward);
  }
}

ScanParams make_params(const ScanShape& s, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C,
                       const at::Tensor& D, const at::Tensor& delta_bias,
                       bool softplus) {
  ScanParams p{};
  p.u = u.const_data_ptr();
  p.delta = delta.const_data_ptr();
  p.B = B.const_data_ptr();
  p.C = C.const_data_ptr();
  p.A = A.const_data_ptr<float>();
  p.D = D.defined() ? D.const_data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.defined() ? delta_bias.const_data_ptr<float>() : nullptr;
  p.batch = s.batch;
  p.channels = s.channels;
  p.length = s.length;
  p.groups = s.groups;
  p.per_group = s.per_group;
  p.d_state = s.d_state;
  p.chunks = (s.length + kChunk - 1) / kChunk;
  p.softplus = softplus;
  return p;
}

FwdResult selective_scan_fwd_cuda(const at::Tensor& u_in,
                                  const at::Tensor& delta_in,
                                  const at::Tensor& A_in,
                                  const at::Tensor& B_in,
                                  const at::Tensor& C_in,
                                  const std::optional<at::Tensor>& D_in,
                                  const std::optional<at::Tensor>& bias_in,
                                  bool delta_softplus) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(),
                   A = A_in.contiguous(), B = B_in.contiguous(),
                   C = C_in.contiguous(), D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in);
  ScanParams p = make_params(s, u, delta, A, B, C, D, bias, delta_softplus);
  at::Tensor y = at::empty(u.sizes(), u.options());
  at::Tensor checkpoints = at::empty({s.batch, s.channels, p.chunks, s.d_state},
                                     u.options().dtype(at::kFloat));
  if (y.numel() == 0) return {y, checkpoints};
  p.y = y.mutable_data_ptr();
  p.checkpoints = checkpoints.mutable_data_ptr<float>();
  MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd_cuda", [&] {
    launch_for_state<scalar_t>(p, /*backward=*/false);
  });
  return {y, checkpoints};
}

BwdResult selective_scan_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in,
    const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& bias_in, bool delta_softplus,
    const at::Tensor& checkpoints_in) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CUDA);
  check_scan_grad_args(grad_in, u_in, checkpoints_in, s, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor dy = grad_in.contiguous(), u = u_in.contiguous(),
                   delta = delta_in.contiguous(), A = A_in.contiguous(),
                   B = B_in.contiguous(), C = C_in.contiguous(),
                   D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in),
                   checkpoints = checkpoints_in.contiguous();
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(u.sizes(), u.options());
  at::Tensor dA = at::zeros(A.sizes(), f32);
  at::Tensor dB = at::zeros(B.sizes(), f32);
  at::Tensor dC = at::zeros(C.sizes(), f32);
  at::Tensor dD = at::zeros({s.channels}, f32);
  at::Tensor dbias = at::zeros({s.channels}, f32);
  if (u.numel() > 0) {
    ScanParams p = make_params(s, u, delta, A, B, C, D, bias, delta_softplus);
    p.dy = dy.const_data_ptr();
    p.checkpoints = const_cast<float*>(checkpoints.const_data_ptr<float>());
    p.du = du.mutable_data_ptr();
    p.ddelta = ddelta.mutable_data_ptr();
    p.dA = dA.mutable_data_ptr<float>();
    p.dB = dB.mutable_data_ptr<float>();
    p.dC = dC.mutable_data_ptr<float>();
    p.dD = dD.mutable_data_ptr<float>();
    p.ddelta_bias = dbias.mutable_data_ptr<float>();
    MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_bwd_cuda", [&] {
      launch_for_state<scalar_t>(p, /*backward=*/true);
    });
  }
  return {du, ddelta, dA, dB.to(u.scalar_type()), dC.to(u.scalar_type()), dD,
          dbias};
}

}  // namespace
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CUDA, m) {
  m.impl("selective_scan_fwd", &mmvmamba::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &mmvmamba::selective_scan_bwd_cuda);
}
