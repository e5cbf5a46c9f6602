// SS2D's fused layout (CrossIo): the four scan orders of one channels-last
// map. u is (batch, L = H*W, D) and read in direction k's order by index (no
// copies); the group of a block is its direction. x_dbl (batch, L, 4,
// R + 2N) holds each position's projections per direction: the step size is
// computed in the kernel from its low-rank part (delta = dt_weight[k] @
// dt_low), and the four outputs are summed into one float32 (batch, L, D)
// map with atomics. The backward likewise sums du over directions, and turns
// the step-size gradient of each tile into those of dt_low (into dx_dbl) and
// of dt_weight in shared memory: nothing of size (batch, L, 4, D) is ever
// written.
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

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
// tile's dt_low (and the backward's d dt_weight), in rows of dt_pitch
// floats: R rounded up to a multiple of 4 and zero-padded, so that the
// products over the rank read 4 ranks a load (float4).
template <typename T_>
struct CrossIo {
  using T = T_;
  static constexpr int Q = 4;
  using Tl = Tile<Q>;
  static constexpr int kStepThreads = kThreads / Tl::channels;  // 4
  static constexpr int kRowLoads = kSteps / kStepThreads;
  static constexpr int kStateThreads = kThreads / Tl::states;   // 8
  static constexpr int kStateLoads = kSteps / kStateThreads;

  // The backward keeps decays where shared memory limits its blocks (long
  // ranks R; see keep_decays in scan_launch.cuh).
  static constexpr bool kMayKeepDecays = true;

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
    for (int i = threadIdx.x; i < Tl::channels * p.dt_pitch; i += kThreads) {
      const int c = i / p.dt_pitch, r = i % p.dt_pitch;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      extra[i] = d_in_group < p.per_group && r < p.rank
                     ? p.dt_weight[(pos.g * p.per_group + d_in_group) * p.rank + r]
                     : 0.0f;
      if (p.ddt_weight != nullptr) dw_s[i] = 0.0f;
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
        for (int r = r0; r < p.dt_pitch; r += kThreads / kSteps) {
          dtl_s[t * p.dt_pitch + r] = ok && r < p.rank ? static_cast<float>(row[r]) : 0.0f;
        }
      }
      __syncthreads();
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      const bool row_ok = d_in_group < p.per_group;
      const float bias = row_ok ? p.delta_bias[pos.g * p.per_group + d_in_group] : 0.0f;
      float x[kRowLoads];
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) x[k] = bias;
      // Four ranks a pass (the padding adds zeros).
      for (int r = 0; r < p.rank; r += 4) {
        const float4 w = *reinterpret_cast<const float4*>(w_s + c * p.dt_pitch + r);
#pragma unroll
        for (int k = 0; k < kRowLoads; ++k) {
          const float4 v = *reinterpret_cast<const float4*>(
              dtl_s + (j + k * kStepThreads) * p.dt_pitch + r);
          x[k] = fmaf(w.x, v.x, x[k]);
          x[k] = fmaf(w.y, v.y, x[k]);
          x[k] = fmaf(w.z, v.z, x[k]);
          x[k] = fmaf(w.w, v.w, x[k]);
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

  // Adds du to the merged float32 map; adds the gradient of dt_low
  // (d dt_low[t] = sum_c dd[c][t] W[c], over the block's channels) into
  // dx_dbl; accumulates d dt_weight (dW[c] += sum_t dd[c][t] dt_low[t]). dd
  // holds d(step size) before the softplus, zero past L and for padding
  // channels.
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const float* du_s,
                                     const float* dd_s, float* extra) {
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
    // Four ranks a pass (float4 rows; sums over the padding are not kept).
    constexpr int kHalf = kSteps / 2;
    {
      // Thread: steps t and t + 32, ranks 4g .. 4g + 3 for g = warp,
      // warp + kWarps, ...
      const int t = threadIdx.x % kHalf;
      const int g0 = threadIdx.x / kHalf;
      float* rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t l = l0 + t + h * kHalf;
        rows[h] = l < p.length ? p.dx_dbl +
                                     (pos.b * p.length + position(p, pos, l)) *
                                         p.row_stride + x_offset
                               : nullptr;
      }
      for (int r = 4 * g0; r < p.rank; r += 4 * (kThreads / kHalf)) {
        float sum[2][4] = {};
#pragma unroll 8
        for (int c = 0; c < Tl::channels; ++c) {
          const float4 w = *reinterpret_cast<const float4*>(w_s + c * p.dt_pitch + r);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float d = dd_s[c * kRow + t + h * kHalf];
            sum[h][0] = fmaf(d, w.x, sum[h][0]);
            sum[h][1] = fmaf(d, w.y, sum[h][1]);
            sum[h][2] = fmaf(d, w.z, sum[h][2]);
            sum[h][3] = fmaf(d, w.w, sum[h][3]);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (rows[h] != nullptr && r + i < p.rank) atomicAdd(rows[h] + r + i, sum[h][i]);
          }
        }
      }
    }
    {
      // Thread: channel c, ranks 4g .. 4g + 3 for g = warp, warp + kWarps, ...
      const int c = threadIdx.x % Tl::channels;
      const int g0 = threadIdx.x / Tl::channels;
      for (int r = 4 * g0; r < p.rank; r += 4 * (kThreads / Tl::channels)) {
        float sum[4] = {};
#pragma unroll 8
        for (int t = 0; t < kSteps; ++t) {
          const float d = dd_s[c * kRow + t];
          const float4 v = *reinterpret_cast<const float4*>(dtl_s + t * p.dt_pitch + r);
          sum[0] = fmaf(d, v.x, sum[0]);
          sum[1] = fmaf(d, v.y, sum[1]);
          sum[2] = fmaf(d, v.z, sum[2]);
          sum[3] = fmaf(d, v.w, sum[3]);
        }
        float4* dw = reinterpret_cast<float4*>(dw_s + c * p.dt_pitch + r);
        float4 acc = *dw;
        acc.x += sum[0];
        acc.y += sum[1];
        acc.z += sum[2];
        acc.w += sum[3];
        *dw = acc;
      }
    }
  }

  // Adds the block's dB / dC of the kPiece steps from l (the warps' terms in
  // `grads`, see sum_state_grad) into dx_dbl. Threads take consecutive
  // values of a step (one row of x_dbl).
  __device__ static void store_state_grads(const ScanParams& p,
                                           const BlockPos& pos, int64_t l,
                                           const float* grads) {
    const int x_offset = static_cast<int>(pos.g) * (p.rank + 2 * p.d_state) + p.rank;
#pragma unroll
    for (int i = threadIdx.x; i < 2 * Tl::states * kPiece; i += kThreads) {
      const int j = i % (2 * Tl::states), t = i / (2 * Tl::states);
      const int n = j % Tl::states;
      if (n < p.d_state && l + t < p.length) {
        float* row = p.dx_dbl +
                     (pos.b * p.length + position(p, pos, l + t)) * p.row_stride +
                     x_offset;
        atomicAdd(row + (j < Tl::states ? n : p.d_state + n),
                  sum_state_grad<Q>(grads, t, j));
      }
    }
  }
};

}  // namespace scan_cuda
}  // namespace mmvmamba
