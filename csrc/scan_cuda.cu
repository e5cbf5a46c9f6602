// CUDA implementation of mmvmamba::selective_scan_fwd / _bwd and of the
// fused four-direction scan mmvmamba::cross_scan_fwd / _bwd.
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
// The forward saves every row's state at the end of each chunk. The backward
// walks the chunks in reverse: it restarts from the saved state, recomputes
// the chunk forward keeping the state every 8 steps in registers, then for
// each 8-step piece recomputes its states (registers) and runs the reverse
// scan. dB / dC are summed over the warp's channels by a butterfly of
// shuffles, over the block in shared memory, and over blocks by float atomics.
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
// (choose_segments) to give about 4 waves of blocks; the environment variable
// MMVMAMBA_SCAN_SEGMENT_CHUNKS=n forces segments of n chunks (of 64 steps),
// and 0 a single segment (unset or empty: the choice above; any other value
// is an error). With one segment nothing extra runs.
//
// The kernels are written once and read / write their tensors through an
// "Io" policy:
// * SeqIo: the plain op, u / delta / y of shape (batch, channels, L) and
//   B / C of shape (batch, groups, N, L).
// * CrossIo: SS2D's four scan orders of one channels-last map. u is
//   (batch, L = H*W, D) and read in direction k's order by index (no copies);
//   the group of a block is its direction. x_dbl (batch, L, 4, R + 2N) holds
//   each position's projections per direction: the step size is computed in
//   the kernel from its low-rank part (delta = dt_weight[k] @ dt_low), and
//   the four outputs are summed into one float32 (batch, L, D) map with
//   atomics. The backward likewise sums du over directions, and turns the
//   step-size gradient of each tile into those of dt_low (into dx_dbl) and
//   of dt_weight in shared memory: nothing of size (batch, L, 4, D) is
//   ever written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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

// Shared-memory tiles of a block, kSteps steps deep: per channel (rows of
// kRow) u, step sizes and dy; per step (rows of state_row) B and C.
struct TileSmem {
  float *u, *dt, *dy, *B, *C;
};

// The plain op's tensors. One tile's loads: u, delta (and dy) of the block's
// channels for steps [l0, l0 + kSteps), and the group's B and C. fetch()
// issues every load at once into registers; stage() converts them and stores
// them in shared memory (step sizes after bias and softplus; B, C as
// [step][state]). Entries past L, past the group or past N are zero, and a
// zero step is the identity. A row (channel or state) is read by
// kThreads / rows threads, thread j of them taking steps j, j + R, j + 2R,
// ...: one base address per row.
template <typename T_, int Q_>
struct SeqIo {
  using T = T_;
  static constexpr int Q = Q_;
  using Tl = Tile<Q>;
  static constexpr int kRowThreads = kThreads / Tl::channels;
  static constexpr int kRowLoads = kSteps / kRowThreads;
  static constexpr int kStateThreads = kThreads / Tl::states;
  static constexpr int kStateLoads = kSteps / kStateThreads;

  static int extra_floats(const ScanParams&, bool) { return 0; }
  __device__ static void prepare(const ScanParams&, const BlockPos&, float*) {}
  __device__ static void finish(const ScanParams&, const BlockPos&, float*) {}

  template <bool kWithDy>
  struct Loads {
    T u[kRowLoads], delta[kRowLoads], dy[kWithDy ? kRowLoads : 1];
    T B[kStateLoads], C[kStateLoads];

    __device__ void fetch(const ScanParams& p, const BlockPos& pos, int64_t l0) {
      const T zero = T(0.0f);
      {
        const int c = threadIdx.x / kRowThreads;
        const int64_t l = l0 + threadIdx.x % kRowThreads;
        const int64_t d_in_group = pos.cblock * Tl::channels + c;
        const bool row_ok = d_in_group < p.per_group;
        const int64_t at = (pos.b * p.channels + pos.g * p.per_group +
                            (row_ok ? d_in_group : 0)) * p.length + l;
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
                          const TileSmem& s, float*) const {
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
          s.u[c * kRow + t] = static_cast<float>(u[k]);
          s.dt[c * kRow + t] = row_ok && l0 + t < p.length ? dt : 0.0f;
          if constexpr (kWithDy) s.dy[c * kRow + t] = static_cast<float>(dy[k]);
        }
      }
      const int n = threadIdx.x / kStateThreads;
      const int j = threadIdx.x % kStateThreads;
#pragma unroll
      for (int k = 0; k < kStateLoads; ++k) {
        const int t = j + k * kStateThreads;
        s.B[t * Tl::state_row + n] = static_cast<float>(B[k]);
        s.C[t * Tl::state_row + n] = static_cast<float>(C[k]);
      }
    }
  };

  // y of the tile's steps (in `y_s`, rows of kRow per channel).
  __device__ static void store_y(const ScanParams& p, const BlockPos& pos,
                                 int64_t l0, const float* y_s) {
    for (int i = threadIdx.x; i < Tl::channels * kSteps; i += kThreads) {
      const int c = i / kSteps, t = i % kSteps;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      if (d_in_group < p.per_group && l0 + t < p.length) {
        const int64_t at = (pos.b * p.channels + pos.g * p.per_group + d_in_group) *
                               p.length + l0 + t;
        static_cast<T*>(p.y)[at] = static_cast<T>(y_s[c * kRow + t]);
      }
    }
  }

  // du and d(delta) of the tile (rows of kRow), and dB / dC ([step][state]),
  // which it also zeroes for the next tile.
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const float* du_s,
                                     const float* dd_s, float* dB_s, float* dC_s,
                                     float*) {
    for (int i = threadIdx.x; i < Tl::channels * kSteps; i += kThreads) {
      const int c = i / kSteps, t = i % kSteps;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      if (d_in_group < p.per_group && l0 + t < p.length) {
        const int64_t at = (pos.b * p.channels + pos.g * p.per_group + d_in_group) *
                               p.length + l0 + t;
        static_cast<T*>(p.du)[at] = static_cast<T>(du_s[c * kRow + t]);
        static_cast<T*>(p.ddelta)[at] = static_cast<T>(dd_s[c * kRow + t]);
      }
    }
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
};

// Row-major position of step l of scan order k on an H x W map: k = 0 rows,
// 1 columns (l = w H + h), 2 and 3 the same reversed. l / H in floats is
// exact for H W < 2^22 (checked on the host): (l + 0.5) / H lies at least
// 0.5 / H away from an integer.
__device__ __forceinline__ int cross_position(int k, int l, int H, int W,
                                              float inv_h) {
  if (k >= 2) l = H * W - 1 - l;
  if (k & 1) {
    const int w = static_cast<int>((static_cast<float>(l) + 0.5f) * inv_h);
    return (l - w * H) * W + w;
  }
  return l;
}

// SS2D's fused layout (see the top of the file); N <= 16, so Q = 4. A warp
// reads 32 channels of one position (coalesced in every scan order); the
// extra shared memory holds dt_weight of the block's channels and the
// tile's dt_low, both in rows of dt_pitch (odd) floats.
template <typename T_>
struct CrossIo {
  using T = T_;
  static constexpr int Q = 4;
  using Tl = Tile<Q>;
  static constexpr int kStepThreads = kThreads / Tl::channels;  // 4
  static constexpr int kRowLoads = kSteps / kStepThreads;
  static constexpr int kStateThreads = kThreads / Tl::states;   // 8
  static constexpr int kStateLoads = kSteps / kStateThreads;

  // dt_weight rows, the tile's dt_low, and (backward) d dt_weight rows.
  static int extra_floats(const ScanParams& p, bool backward) {
    return ((backward ? 2 : 1) * Tl::channels + kSteps) * p.dt_pitch;
  }

  __device__ static int position(const ScanParams& p, const BlockPos& pos,
                                 int64_t l) {
    return cross_position(static_cast<int>(pos.g), static_cast<int>(l),
                          p.height, p.width, p.inv_height);
  }

  // Element (b, position, channel) of a (batch, L, D) map.
  __device__ static int64_t map_index(const ScanParams& p, const BlockPos& pos,
                                      int position, int64_t d_in_group) {
    return (pos.b * p.length + position) * p.per_group + d_in_group;
  }

  // The block's rows of dt_weight, kept for the whole kernel; the
  // backward's d dt_weight rows start at zero.
  __device__ static void prepare(const ScanParams& p, const BlockPos& pos,
                                 float* extra) {
    float* dw_s = extra + (Tl::channels + kSteps) * p.dt_pitch;
    for (int i = threadIdx.x; i < Tl::channels * p.rank; i += kThreads) {
      const int c = i / p.rank, r = i % p.rank;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      extra[c * p.dt_pitch + r] =
          d_in_group < p.per_group
              ? p.dt_weight[(pos.g * p.per_group + d_in_group) * p.rank + r]
              : 0.0f;
      if (p.ddt_weight != nullptr) dw_s[c * p.dt_pitch + r] = 0.0f;
    }
  }

  // Adds the block's d dt_weight rows to the gradient.
  __device__ static void finish(const ScanParams& p, const BlockPos& pos,
                                float* extra) {
    __syncthreads();
    const float* dw_s = extra + (Tl::channels + kSteps) * p.dt_pitch;
    for (int i = threadIdx.x; i < Tl::channels * p.rank; i += kThreads) {
      const int c = i / p.rank, r = i % p.rank;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      if (d_in_group < p.per_group) {
        atomicAdd(p.ddt_weight + (pos.g * p.per_group + d_in_group) * p.rank + r,
                  dw_s[c * p.dt_pitch + r]);
      }
    }
  }

  template <bool kWithDy>
  struct Loads {
    T u[kRowLoads], B[kStateLoads], C[kStateLoads];
    float dy[kWithDy ? kRowLoads : 1];

    __device__ void fetch(const ScanParams& p, const BlockPos& pos, int64_t l0) {
      const T zero = T(0.0f);
      {
        const int c = threadIdx.x % Tl::channels;
        const int j = threadIdx.x / Tl::channels;
        const int64_t d_in_group = pos.cblock * Tl::channels + c;
        const bool row_ok = d_in_group < p.per_group;
#pragma unroll
        for (int k = 0; k < kRowLoads; ++k) {
          const int64_t l = l0 + j + k * kStepThreads;
          const bool ok = row_ok && l < p.length;
          const int64_t at = ok ? map_index(p, pos, position(p, pos, l), d_in_group) : 0;
          u[k] = ok ? static_cast<const T*>(p.u)[at] : zero;
          if constexpr (kWithDy) dy[k] = ok ? static_cast<const float*>(p.dy)[at] : 0.0f;
        }
      }
      const int n = threadIdx.x % Tl::states;
      const int j = threadIdx.x / Tl::states;
      const bool state_ok = n < p.d_state;
      const T* x_dbl = static_cast<const T*>(p.delta) +
                       pos.g * (p.rank + 2 * p.d_state) + p.rank + n;
#pragma unroll
      for (int k = 0; k < kStateLoads; ++k) {
        const int64_t l = l0 + j + k * kStateThreads;
        const bool ok = state_ok && l < p.length;
        const T* row = x_dbl + (pos.b * p.length + (ok ? position(p, pos, l) : 0)) *
                                   p.row_stride;
        B[k] = ok ? row[0] : zero;
        C[k] = ok ? row[p.d_state] : zero;
      }
    }

    // Stores the loads, then the tile's dt_low, then computes the step sizes
    // softplus(bias + dt_weight @ dt_low) of the block's channels.
    __device__ void stage(const ScanParams& p, const BlockPos& pos, int64_t l0,
                          const TileSmem& s, float* extra) const {
      const int c = threadIdx.x % Tl::channels;
      const int j = threadIdx.x / Tl::channels;
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) {
        const int t = j + k * kStepThreads;
        s.u[c * kRow + t] = static_cast<float>(u[k]);
        if constexpr (kWithDy) s.dy[c * kRow + t] = dy[k];
      }
      {
        const int n = threadIdx.x % Tl::states;
        const int js = threadIdx.x / Tl::states;
#pragma unroll
        for (int k = 0; k < kStateLoads; ++k) {
          const int t = js + k * kStateThreads;
          s.B[t * Tl::state_row + n] = static_cast<float>(B[k]);
          s.C[t * Tl::state_row + n] = static_cast<float>(C[k]);
        }
      }
      const float* w_s = extra;
      float* dtl_s = extra + Tl::channels * p.dt_pitch;
      {
        // Thread: step t, ranks r0, r0 + 2, ...
        const int t = threadIdx.x % kSteps;
        const int r0 = threadIdx.x / kSteps;
        const int64_t l = l0 + t;
        const bool ok = l < p.length;
        const T* row = static_cast<const T*>(p.delta) +
                       (pos.b * p.length + (ok ? position(p, pos, l) : 0)) * p.row_stride +
                       pos.g * (p.rank + 2 * p.d_state);
        for (int r = r0; r < p.rank; r += kThreads / kSteps) {
          dtl_s[t * p.dt_pitch + r] = ok ? static_cast<float>(row[r]) : 0.0f;
        }
      }
      __syncthreads();
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      const bool row_ok = d_in_group < p.per_group;
      const float bias = row_ok ? p.delta_bias[pos.g * p.per_group + d_in_group] : 0.0f;
      float x[kRowLoads];
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) x[k] = bias;
      for (int r = 0; r < p.rank; ++r) {
        const float w = w_s[c * p.dt_pitch + r];
#pragma unroll
        for (int k = 0; k < kRowLoads; ++k) {
          x[k] = fmaf(w, dtl_s[(j + k * kStepThreads) * p.dt_pitch + r], x[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) {
        const int t = j + k * kStepThreads;
        s.dt[c * kRow + t] = row_ok && l0 + t < p.length ? softplus(x[k]) : 0.0f;
      }
    }
  };

  // Adds the tile's y to the merged float32 map.
  __device__ static void store_y(const ScanParams& p, const BlockPos& pos,
                                 int64_t l0, const float* y_s) {
    for (int i = threadIdx.x; i < Tl::channels * kSteps; i += kThreads) {
      const int c = i % Tl::channels, t = i / Tl::channels;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      if (d_in_group < p.per_group && l0 + t < p.length) {
        const int at = position(p, pos, l0 + t);
        atomicAdd(static_cast<float*>(p.y) + map_index(p, pos, at, d_in_group),
                  y_s[c * kRow + t]);
      }
    }
  }

  // Adds du to the merged float32 map; adds the gradients of dt_low
  // (d dt_low[t] = sum_c dd[c][t] W[c], over the block's channels) and of B
  // and C into dx_dbl, zeroing dB_s / dC_s; accumulates d dt_weight
  // (dW[c] += sum_t dd[c][t] dt_low[t]). dd holds d(step size) before the
  // softplus, zero past L and for padding channels.
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const float* du_s,
                                     const float* dd_s, float* dB_s, float* dC_s,
                                     float* extra) {
    for (int i = threadIdx.x; i < Tl::channels * kSteps; i += kThreads) {
      const int c = i % Tl::channels, t = i / Tl::channels;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      if (d_in_group < p.per_group && l0 + t < p.length) {
        const int at = position(p, pos, l0 + t);
        atomicAdd(static_cast<float*>(p.du) + map_index(p, pos, at, d_in_group),
                  du_s[c * kRow + t]);
      }
    }
    const float* w_s = extra;
    const float* dtl_s = extra + Tl::channels * p.dt_pitch;
    float* dw_s = extra + (Tl::channels + kSteps) * p.dt_pitch;
    const int x_offset = static_cast<int>(pos.g) * (p.rank + 2 * p.d_state);
    {
      // Thread: step t, ranks r0, r0 + 2, ... (as the dt_low loads).
      const int t = threadIdx.x % kSteps;
      const int r0 = threadIdx.x / kSteps;
      if (l0 + t < p.length) {
        float* row = p.dx_dbl +
                     (pos.b * p.length + position(p, pos, l0 + t)) * p.row_stride +
                     x_offset;
        for (int r = r0; r < p.rank; r += kThreads / kSteps) {
          float sum = 0.0f;
#pragma unroll 8
          for (int c = 0; c < Tl::channels; ++c) {
            sum = fmaf(dd_s[c * kRow + t], w_s[c * p.dt_pitch + r], sum);
          }
          atomicAdd(row + r, sum);
        }
      }
    }
    {
      // Thread: channel c, ranks r0, r0 + 4, ...
      const int c = threadIdx.x % Tl::channels;
      const int r0 = threadIdx.x / Tl::channels;
      for (int r = r0; r < p.rank; r += kThreads / Tl::channels) {
        float sum = 0.0f;
#pragma unroll 8
        for (int t = 0; t < kSteps; ++t) {
          sum = fmaf(dd_s[c * kRow + t], dtl_s[t * p.dt_pitch + r], sum);
        }
        dw_s[c * p.dt_pitch + r] += sum;
      }
    }
    for (int i = threadIdx.x; i < Tl::states * kSteps; i += kThreads) {
      const int n = i % Tl::states, t = i / Tl::states;
      const int64_t l = l0 + t;
      if (n < p.d_state && l < p.length) {
        float* row = p.dx_dbl + (pos.b * p.length + position(p, pos, l)) * p.row_stride +
                     x_offset + p.rank;
        atomicAdd(row + n, dB_s[t * Tl::states + n]);
        atomicAdd(row + p.d_state + n, dC_s[t * Tl::states + n]);
      }
      dB_s[t * Tl::states + n] = 0.0f;
      dC_s[t * Tl::states + n] = 0.0f;
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

template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::fwd_blocks_per_sm)
    scan_fwd_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  constexpr int kWarpChannels = 32 / Q;
  constexpr int kOutPerLane = kWarpChannels * kPart / 32;
  extern __shared__ float smem[];
  TileSmem s;
  s.u = smem;
  s.dt = s.u + Tl::channels * kRow;
  s.dy = nullptr;
  s.B = s.dt + Tl::channels * kRow;
  s.C = s.B + kSteps * Tl::state_row;
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32;
  float* part = s.C + kSteps * Tl::state_row + warp * kPart * 32;
  float* extra = s.C + kSteps * Tl::state_row + kThreads * kPart;

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
  tile.fetch(p, pos, static_cast<int64_t>(range.first) * kSteps);
  // `left` counts the segment's chunks down (a comparison with its end
  // instead spills the SeqIo<float, 16> instantiation).
  int chunk = range.first;
  for (int left = range.end - range.first; left > 0; --left, ++chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    const int steps = p.length - l0 < kSteps ? static_cast<int>(p.length - l0) : kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, s, extra);
    __syncthreads();
    // The next tile's loads fly while this one is scanned.
    if (left > 1) tile.fetch(p, pos, l0 + kSteps);
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
    Io::store_y(p, pos, l0, s.dt);
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

template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::bwd_blocks_per_sm)
    scan_bwd_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
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
  float* extra = dC_s + kSteps * Tl::states + 2 * kThreads * kPiece;
  const TileSmem tiles{u_s, dt_s, dy_s, B_s, C_s};

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  for (int i = threadIdx.x; i < 2 * kSteps * Tl::states; i += kThreads) {
    dB_s[i] = 0.0f;
  }
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

  for (int chunk = range.end - 1; chunk >= range.first; --chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    typename Io::template Loads<true> tile;
    tile.fetch(p, pos, l0);
    __syncthreads();
    tile.stage(p, pos, l0, tiles, extra);
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
      __syncwarp();
    }
    __syncthreads();
    Io::store_grads(p, pos, l0, u_s, dt_s, dB_s, dC_s, extra);
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
  TileSmem s;
  s.u = smem;
  s.dt = s.u + Tl::channels * kRow;
  s.dy = nullptr;
  s.B = s.dt + Tl::channels * kRow;
  s.C = s.B + kSteps * Tl::state_row;
  float* extra = s.C + kSteps * Tl::state_row;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  const SegmentRange range = segment_range(p);
  const float* urow = s.u + lane.c * kRow;
  const float* dtrow = s.dt + lane.c * kRow;
  float h[kP] = {}, dt_sum = 0.0f;
  typename Io::template Loads<false> tile;
  tile.fetch(p, pos, static_cast<int64_t>(range.first) * kSteps);
  for (int chunk = range.first; chunk < range.end; ++chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, s, extra);
    __syncthreads();
    if (chunk + 1 < range.end) tile.fetch(p, pos, l0 + kSteps);
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

// Backward: segments 1 .. S-1 (blockIdx.y + 1), chunks and steps in
// reverse, to seg_state / seg_dt.
template <typename Io>
__global__ void __launch_bounds__(kThreads, Tile<Io::Q>::bwd_blocks_per_sm)
    scan_bwd_summary_kernel(const ScanParams p) {
  constexpr int Q = Io::Q;
  using Tl = Tile<Q>;
  extern __shared__ float smem[];
  TileSmem s;
  s.u = smem;
  s.dt = s.u + Tl::channels * kRow;
  s.dy = s.dt + Tl::channels * kRow;
  s.B = s.dy + Tl::channels * kRow;
  s.C = s.B + kSteps * Tl::state_row;
  float* extra = s.C + kSteps * Tl::state_row;

  const BlockPos pos = block_pos(p);
  const Lane<Q> lane(p, pos);
  Io::prepare(p, pos, extra);
  const int seg = blockIdx.y + 1;
  const SegmentRange range = segment_range(p, 1);
  const float* dtrow = s.dt + lane.c * kRow;
  const float* dyrow = s.dy + lane.c * kRow;
  float dh[kP] = {}, decay_next[kP] = {}, dt_sum = 0.0f;
  typename Io::template Loads<true> tile;
  tile.fetch(p, pos, static_cast<int64_t>(range.end - 1) * kSteps);
  for (int chunk = range.end - 1; chunk >= range.first; --chunk) {
    const int64_t l0 = static_cast<int64_t>(chunk) * kSteps;
    __syncthreads();
    tile.stage(p, pos, l0, s, extra);
    __syncthreads();
    if (chunk > range.first) tile.fetch(p, pos, l0 - kSteps);
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

// Chains the segment summaries into the carry entering each segment, one
// thread per (batch, channel, state): forward, the true start state h_s of
// segment s (h_0 = 0, h_{s+1} = exp2(a dt_s) h_s + end_s); reverse, the
// carry from its right (c_{S-1} = 0, c_{s-1} = exp2(a dt_s) c_s + out_s).
// Each replaces the summary in seg_state; the skipped segment's (never
// written) is only overwritten.
__global__ void scan_carry_kernel(const ScanParams p, bool reverse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.channels * p.d_state) return;
  const int64_t row = i / p.d_state;  // b * channels + d
  const int64_t n = i % p.d_state;
  const float a = p.A[(row % p.channels) * p.d_state + n] * kLog2e;
  float* state = p.seg_state + row * p.segments * p.d_state + n;
  const float* dt_sum = p.seg_dt + row * p.segments;
  float carry = 0.0f;
  for (int k = 0;; ++k) {
    const int seg = reverse ? p.segments - 1 - k : k;
    float* at = state + seg * p.d_state;
    if (k + 1 == p.segments) {
      *at = carry;
      break;
    }
    const float summary = *at;
    *at = carry;
    carry = exp2f(a * dt_sum[seg]) * carry + summary;
  }
}

// Dynamic shared memory of a kernel: the full pass, or (summary) its tiles.
template <typename Io>
int shared_bytes(const ScanParams& p, bool backward, bool summary) {
  using Tl = Tile<Io::Q>;
  int floats = 2 * kSteps * Tl::state_row + Io::extra_floats(p, backward) +
               (backward ? 3 : 2) * Tl::channels * kRow;
  if (!summary) {
    floats += backward ? 2 * kSteps * Tl::states + 2 * kThreads * kPiece
                       : kThreads * kPart;
  }
  return floats * static_cast<int>(sizeof(float));
}

// Segments are at least this many chunks long (unless forced).
constexpr int64_t kMinSegChunks = 4;
constexpr const char* kSegmentChunksEnv = "MMVMAMBA_SCAN_SEGMENT_CHUNKS";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// MMVMAMBA_SCAN_SEGMENT_CHUNKS: -1 when unset or empty, else its value.
int64_t segment_chunks_from_env() {
  const char* value = std::getenv(kSegmentChunksEnv);
  if (value == nullptr || *value == '\0') return -1;
  int64_t chunks = 0;
  bool ok = true;
  for (const char* c = value; *c != '\0' && ok; ++c) {
    ok = *c >= '0' && *c <= '9' && chunks < (int64_t{1} << 40);
    chunks = chunks * 10 + (*c - '0');
  }
  TORCH_CHECK(ok, kSegmentChunksEnv, " must be a non-negative integer: the "
              "chunks of ", std::to_string(kChunk), " steps per segment of the "
              "CUDA scans, 0 for one segment; got '", value, "'");
  return chunks;
}

// Sets p.seg_chunks / p.segments for a launch of `blocks` blocks per
// segment. The sequence is split when those leave the GPU short of about 4
// waves of blocks_per_sm blocks on every SM, into as many segments as fill
// them, each at least kMinSegChunks chunks long; the environment variable
// above overrides that.
void choose_segments(ScanParams& p, int64_t blocks, int blocks_per_sm) {
  int64_t seg_chunks = p.chunks;
  const int64_t forced = segment_chunks_from_env();
  if (forced > 0) {
    seg_chunks = forced;
  } else if (forced < 0 && p.chunks >= 2 * kMinSegChunks) {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          device));
    const int64_t target = int64_t{4} * sms * blocks_per_sm;
    if (blocks < target) {
      seg_chunks = std::max(kMinSegChunks, ceil_div(p.chunks * blocks, target));
    }
  }
  // At most 65535 segments (gridDim.y), at most one.
  seg_chunks = std::min(std::max(seg_chunks, ceil_div(p.chunks, 65535)), p.chunks);
  p.seg_chunks = static_cast<int>(seg_chunks);
  p.segments = static_cast<int>(ceil_div(p.chunks, seg_chunks));
}

// One pass (forward or backward) of Io's scan. With several segments: their
// summaries (all but the one whose summary is never used), the carries
// between them, then the full pass of every segment; `f32` places the
// scratch tensors.
template <typename Io>
void launch(ScanParams& p, bool backward, const at::TensorOptions& f32) {
  using Tl = Tile<Io::Q>;
  p.channel_blocks = static_cast<int>((p.per_group + Tl::channels - 1) / Tl::channels);
  const int64_t blocks = p.batch * p.groups * p.channel_blocks;
  TORCH_CHECK(blocks <= INT32_MAX, "selective_scan: batch x channels too "
              "large for one launch (", std::to_string(blocks), " blocks)");
  TORCH_CHECK(p.chunks < (int64_t{1} << 30), "selective_scan: sequence too "
              "long (", std::to_string(p.length), " steps)");
  choose_segments(p, blocks,
                  backward ? Tl::bwd_blocks_per_sm : Tl::fwd_blocks_per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Freed when this returns: the caching allocator reuses memory in stream
  // order, after the kernels below.
  at::Tensor seg_state, seg_dt;
  if (p.segments > 1) {
    seg_state = at::empty({p.batch, p.channels, p.segments, p.d_state}, f32);
    seg_dt = at::empty({p.batch, p.channels, p.segments}, f32);
    p.seg_state = seg_state.mutable_data_ptr<float>();
    p.seg_dt = seg_dt.mutable_data_ptr<float>();
    const int smem = shared_bytes<Io>(p, backward, /*summary=*/true);
    auto summary = backward ? scan_bwd_summary_kernel<Io> : scan_fwd_summary_kernel<Io>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        summary, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    summary<<<dim3(static_cast<unsigned>(blocks), p.segments - 1), kThreads, smem,
              stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kCarryThreads = 256;
    const int64_t rows = p.batch * p.channels * p.d_state;
    scan_carry_kernel<<<static_cast<unsigned>(ceil_div(rows, kCarryThreads)),
                        kCarryThreads, 0, stream>>>(p, backward);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int smem = shared_bytes<Io>(p, backward, /*summary=*/false);
  auto kernel = backward ? scan_bwd_kernel<Io> : scan_fwd_kernel<Io>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<dim3(static_cast<unsigned>(blocks), p.segments), kThreads, smem,
           stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_state(ScanParams& p, bool backward, const at::TensorOptions& f32) {
  if (p.d_state <= 16) {
    launch<SeqIo<T, 4>>(p, backward, f32);
  } else {
    launch<SeqIo<T, 16>>(p, backward, f32);
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
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor y = at::empty(u.sizes(), u.options());
  at::Tensor checkpoints =
      at::empty({s.batch, s.channels, p.chunks, s.d_state}, f32);
  if (y.numel() == 0) return {y, checkpoints};
  p.y = y.mutable_data_ptr();
  p.checkpoints = checkpoints.mutable_data_ptr<float>();
  MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd_cuda", [&] {
    launch_for_state<scalar_t>(p, /*backward=*/false, f32);
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
      launch_for_state<scalar_t>(p, /*backward=*/true, f32);
    });
  }
  return {du, ddelta, dA, dB.to(u.scalar_type()), dC.to(u.scalar_type()), dD,
          dbias};
}

// The fused SS2D core: parameters of a (batch, L, D) map and its x_dbl.
ScanParams make_cross_params(const CrossShape& s, const at::Tensor& u,
                             const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                             const at::Tensor& dt_bias, const at::Tensor& A,
                             const at::Tensor& D) {
  ScanParams p{};
  p.u = u.const_data_ptr();
  p.delta = x_dbl.const_data_ptr();
  p.A = A.const_data_ptr<float>();
  p.D = D.const_data_ptr<float>();
  p.delta_bias = dt_bias.const_data_ptr<float>();
  p.dt_weight = dt_weight.const_data_ptr<float>();
  p.batch = s.batch;
  p.groups = kDirections;
  p.per_group = s.d_inner;
  p.channels = kDirections * s.d_inner;
  p.length = s.height * s.width;
  p.d_state = s.d_state;
  p.chunks = (p.length + kChunk - 1) / kChunk;
  p.softplus = true;
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.rank = static_cast<int>(s.rank);
  p.row_stride = static_cast<int>(kDirections * (s.rank + 2 * s.d_state));
  p.dt_pitch = p.rank | 1;  // odd: conflict-free rows in shared memory
  p.inv_height = 1.0f / static_cast<float>(s.height);
  return p;
}

#define MMVMAMBA_DISPATCH_CROSS_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

FwdResult cross_scan_fwd_cuda(const at::Tensor& u_in, const at::Tensor& x_dbl_in,
                              const at::Tensor& dt_weight_in,
                              const at::Tensor& dt_bias_in, const at::Tensor& A_in,
                              const at::Tensor& D_in, int64_t height,
                              int64_t width) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous(), x_dbl = x_dbl_in.contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous();
  ScanParams p = make_cross_params(s, u, x_dbl, dt_weight, dt_bias, A, D);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor y = at::zeros(u.sizes(), f32);
  at::Tensor checkpoints =
      at::empty({s.batch, p.channels, p.chunks, s.d_state}, f32);
  if (u.numel() == 0) return {y, checkpoints};
  p.y = y.mutable_data_ptr();
  p.checkpoints = checkpoints.mutable_data_ptr<float>();
  MMVMAMBA_DISPATCH_CROSS_TYPES(u.scalar_type(), "cross_scan_fwd_cuda", [&] {
    launch<CrossIo<scalar_t>>(p, /*backward=*/false, f32);
  });
  return {y, checkpoints};
}

CrossBwdResult cross_scan_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& x_dbl_in,
    const at::Tensor& dt_weight_in, const at::Tensor& dt_bias_in,
    const at::Tensor& A_in, const at::Tensor& D_in, int64_t height, int64_t width,
    const at::Tensor& checkpoints_in) {
  const CrossShape s = check_cross_scan_args(u_in, x_dbl_in, dt_weight_in,
                                             dt_bias_in, A_in, D_in, height, width);
  check_cross_scan_grad_args(grad_in, u_in, checkpoints_in, s);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor dy = grad_in.contiguous(), u = u_in.contiguous(),
                   x_dbl = x_dbl_in.contiguous(),
                   dt_weight = dt_weight_in.contiguous(),
                   dt_bias = dt_bias_in.contiguous(), A = A_in.contiguous(),
                   D = D_in.contiguous(), checkpoints = checkpoints_in.contiguous();
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::zeros(u.sizes(), f32);
  at::Tensor dx_dbl = at::zeros(x_dbl.sizes(), f32);
  at::Tensor ddt_weight = at::zeros(dt_weight.sizes(), f32);
  at::Tensor dA = at::zeros(A.sizes(), f32);
  at::Tensor dD = at::zeros(D.sizes(), f32);
  at::Tensor dbias = at::zeros(dt_bias.sizes(), f32);
  if (u.numel() == 0) {
    return {du.to(u.scalar_type()), dx_dbl.to(u.scalar_type()), ddt_weight,
            dbias, dA, dD};
  }
  ScanParams p = make_cross_params(s, u, x_dbl, dt_weight, dt_bias, A, D);
  p.dy = dy.const_data_ptr();
  p.checkpoints = const_cast<float*>(checkpoints.const_data_ptr<float>());
  p.du = du.mutable_data_ptr();
  p.dx_dbl = dx_dbl.mutable_data_ptr<float>();
  p.ddt_weight = ddt_weight.mutable_data_ptr<float>();
  p.dA = dA.mutable_data_ptr<float>();
  p.dD = dD.mutable_data_ptr<float>();
  p.ddelta_bias = dbias.mutable_data_ptr<float>();
  MMVMAMBA_DISPATCH_CROSS_TYPES(u.scalar_type(), "cross_scan_bwd_cuda", [&] {
    launch<CrossIo<scalar_t>>(p, /*backward=*/true, f32);
  });
  return {du.to(u.scalar_type()), dx_dbl.to(u.scalar_type()), ddt_weight, dbias,
          dA, dD};
}

}  // namespace
}  // namespace mmvmamba

TORCH_LIBRARY_IMPL(mmvmamba, CUDA, m) {
  m.impl("selective_scan_fwd", &mmvmamba::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &mmvmamba::selective_scan_bwd_cuda);
  m.impl("cross_scan_fwd", &mmvmamba::cross_scan_fwd_cuda);
  m.impl("cross_scan_bwd", &mmvmamba::cross_scan_bwd_cuda);
}
