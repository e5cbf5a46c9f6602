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

#include <type_traits>

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

// The element `at` rows of `pitch` bytes after `base` (at >= 0, pitch > 0:
// int32, their product 64-bit: one IMAD.WIDE.U32 with the base).
template <typename V>
__device__ __forceinline__ V* row_at(V* base, int at, int pitch) {
  using Byte = std::conditional_t<std::is_const_v<V>, const char, char>;
  const uint64_t offset =
      static_cast<uint64_t>(static_cast<uint32_t>(at)) * static_cast<uint32_t>(pitch);
  return reinterpret_cast<V*>(reinterpret_cast<Byte*>(base) + offset);
}

// SS2D's fused layout (see the top of the file); N <= 16, so Q = 4. A warp
// reads 32 channels of one position (coalesced in every scan order); the
// extra shared memory holds the positions of the next chunk's steps
// (below), dt_weight of the block's channels and the tile's dt_low (and the
// backward's d dt_weight), in rows of dt_pitch floats: R rounded up to a
// multiple of 4 and zero-padded, so that the products over the rank read 4
// ranks a load (float4).
//
// Positions: the map position of step l depends only on the direction and
// l, so each chunk's kSteps positions are computed once, as int32 (0 past
// L, so that every address stays in the map: those steps are masked by
// their index), and every load and store of the chunk reads them in shared
// memory. The address of (b, position, d) is then the thread's (b, 0, d)
// plus position x the bytes of a position, int32 x int32 in 64 bits
// (position < 2^22; D and the x_dbl row, in bytes, below 2^31: checked on
// the host). Two copies: index_chunk writes the chunk to be fetched next
// into a table in the extra floats (read by fetch and stage); stage copies
// it into the padding column (kSteps) of the u and dt tiles, where the
// stores of the chunk read it (the tiles' rows are only ever written at
// steps < kSteps). So the kernels call index_chunk for the next chunk after
// stage (its barrier follows the table's last reads) and before the barrier
// that precedes the next fetch; see the kernels.
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

  // Every load and store of a chunk reads its steps' positions in shared
  // memory (index_chunk); the kernels call it.
  static constexpr bool kPositions = true;
  // The table of the next chunk's kSteps int32 positions, in floats.
  static constexpr int kPositionFloats = kSteps;
  // The scanned chunk's positions lie in the padding column of the u and dt
  // tiles, which are contiguous: rows 0 .. kSteps - 1 of the two.
  template <Pass kPass>
  static constexpr bool kPaddingColumn = SmemLayout<Q, kPass>::u == 0 &&
                                         SmemLayout<Q, kPass>::dt == Tl::channels * kRow;
  static_assert(kPaddingColumn<Pass::kForward> && kPaddingColumn<Pass::kBackward> &&
                    kPaddingColumn<Pass::kForwardSummary> &&
                    kPaddingColumn<Pass::kBackwardSummary> &&
                    2 * Tl::channels >= kSteps && kRow > kSteps,
                "a padding column of kSteps rows in the u and dt tiles");

  // The position table, dt_weight rows, the tile's dt_low, and (backward)
  // d dt_weight rows.
  static int extra_floats(const ScanParams& p, bool backward) {
    return kPositionFloats + ((backward ? 2 : 1) * Tl::channels + kSteps) * p.dt_pitch;
  }

  // The regions of the extra shared memory (16-byte aligned: kPositionFloats
  // and dt_pitch are multiples of 4).
  __device__ static float* weights(float* extra) { return extra + kPositionFloats; }
  __device__ static float* dt_low(float* extra, const ScanParams& p) {
    return weights(extra) + Tl::channels * p.dt_pitch;
  }
  __device__ static float* weight_grads(float* extra, const ScanParams& p) {
    return dt_low(extra, p) + kSteps * p.dt_pitch;
  }

  // Positions are kept in float words, bit for bit (no type punning).
  // The position of step t of the chunk to be fetched (0 past L).
  __device__ static int next_position(const float* extra, int t) {
    return __float_as_int(extra[t]);
  }

  // The position of step t of the chunk being scanned (stage() copied it).
  __device__ static int scanned_position(const TileSmem& s, int t) {
    return __float_as_int(s.u[t * kRow + kSteps]);
  }

  // Writes the positions of chunk `chunk`'s steps into the table (threads 0
  // .. kSteps - 1, one step each). The caller keeps it apart from the
  // table's readers by barriers.
  __device__ static void index_chunk(const ScanParams& p, const BlockPos& pos,
                                     int64_t chunk, float* extra) {
    if (threadIdx.x < kSteps) {
      const int64_t l = chunk * kSteps + threadIdx.x;
      extra[threadIdx.x] = __int_as_float(
          l < p.length ? cross_position(static_cast<int>(pos.g), static_cast<int>(l),
                                        p.height, p.width, p.inv_height)
                       : 0);
    }
  }

  // The steps of the chunk from l0 before L (at most kSteps).
  __device__ static int chunk_steps(const ScanParams& p, int64_t l0) {
    return p.length - l0 < kSteps ? static_cast<int>(p.length - l0) : kSteps;
  }

  // Element (b, 0, 0) of a (batch, L, D) map, and the bytes of a position
  // there (V: the map's type).
  __device__ static int64_t image_start(const ScanParams& p, const BlockPos& pos) {
    return pos.b * p.length * p.per_group;
  }
  template <typename V>
  __device__ static int map_pitch(const ScanParams& p) {
    static_assert(sizeof(V) == 2 || sizeof(V) == 4, "2- or 4-byte elements");
    return p.map_bytes[sizeof(V) / 4];
  }

  // Element (b, 0, 0, 0) of x_dbl (batch, L, 4, R + 2N), and the bytes of a
  // position there (V: x_dbl's or dx_dbl's type).
  __device__ static int64_t x_image_start(const ScanParams& p, const BlockPos& pos) {
    return pos.b * p.length * p.row_stride;
  }
  template <typename V>
  __device__ static int row_pitch(const ScanParams& p) {
    static_assert(sizeof(V) == 2 || sizeof(V) == 4, "2- or 4-byte elements");
    return p.row_bytes[sizeof(V) / 4];
  }

  // The block's rows of dt_weight, kept for the whole kernel; the
  // backward's d dt_weight rows start at zero.
  __device__ static void prepare(const ScanParams& p, const BlockPos& pos,
                                 float* extra) {
    float* w_s = weights(extra);
    float* dw_s = weight_grads(extra, p);
    for (int i = threadIdx.x; i < Tl::channels * p.dt_pitch; i += kThreads) {
      const int c = i / p.dt_pitch, r = i % p.dt_pitch;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      w_s[i] = d_in_group < p.per_group && r < p.rank
                   ? p.dt_weight[(pos.g * p.per_group + d_in_group) * p.rank + r]
                   : 0.0f;
      if (p.ddt_weight != nullptr) dw_s[i] = 0.0f;
    }
  }

  // Adds the block's d dt_weight rows to the gradient.
  __device__ static void finish(const ScanParams& p, const BlockPos& pos,
                                float* extra) {
    __syncthreads();
    const float* dw_s = weight_grads(extra, p);
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

    __device__ void fetch(const ScanParams& p, const BlockPos& pos, int64_t l0,
                          const float* extra) {
      const T zero = T(0.0f);
      const int steps = chunk_steps(p, l0);
      {
        const int c = threadIdx.x % Tl::channels;
        const int j = threadIdx.x / Tl::channels;
        const int64_t d_in_group = pos.cblock * Tl::channels + c;
        const bool row_ok = d_in_group < p.per_group;
        const int64_t start = image_start(p, pos) + (row_ok ? d_in_group : 0);
        const T* u_map = static_cast<const T*>(p.u) + start;
        const float* dy_map =
            kWithDy ? static_cast<const float*>(p.dy) + start : nullptr;
#pragma unroll
        for (int k = 0; k < kRowLoads; ++k) {
          const int at = next_position(extra, j + k * kStepThreads);
          const bool ok = row_ok && j + k * kStepThreads < steps;
          const T* u_at = row_at(u_map, at, map_pitch<T>(p));
          u[k] = ok ? *u_at : zero;
          if constexpr (kWithDy) {
            const float* dy_at = row_at(dy_map, at, map_pitch<float>(p));
            dy[k] = ok ? *dy_at : 0.0f;
          }
        }
      }
      const int n = threadIdx.x % Tl::states;
      const int j = threadIdx.x / Tl::states;
      const bool state_ok = n < p.d_state;
      const T* B_rows = static_cast<const T*>(p.delta) + x_image_start(p, pos) +
                        pos.g * (p.rank + 2 * p.d_state) + p.rank + (state_ok ? n : 0);
      const T* C_rows = B_rows + p.d_state;
#pragma unroll
      for (int k = 0; k < kStateLoads; ++k) {
        const int at = next_position(extra, j + k * kStateThreads);
        const bool ok = state_ok && j + k * kStateThreads < steps;
        const T* B_at = row_at(B_rows, at, row_pitch<T>(p));
        const T* C_at = row_at(C_rows, at, row_pitch<T>(p));
        B[k] = ok ? *B_at : zero;
        C[k] = ok ? *C_at : zero;
      }
    }

    // Stores the loads, then the tile's dt_low (and copies the tile's
    // positions for its stores), then computes the step sizes
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
      const float* w_s = weights(extra);
      float* dtl_s = dt_low(extra, p);
      {
        // Thread: step t, ranks r0, r0 + 2, ...
        const int t = threadIdx.x % kSteps;
        const int r0 = threadIdx.x / kSteps;
        const bool ok = t < chunk_steps(p, l0);
        const int at = next_position(extra, t);
        if (r0 == 0) s.u[t * kRow + kSteps] = __int_as_float(at);
        const T* row = row_at(static_cast<const T*>(p.delta) + x_image_start(p, pos) +
                                  pos.g * (p.rank + 2 * p.d_state),
                              at, row_pitch<T>(p));
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

  // Adds the tile's steps of `tile_s` (rows of kRow per channel: s.u or
  // s.dt) into the merged float32 map `map`: thread channel c, steps t,
  // t + 4, ...
  __device__ static void add_to_map(const ScanParams& p, const BlockPos& pos,
                                    int64_t l0, float* map, const float* tile_s,
                                    const TileSmem& s) {
    const int c = threadIdx.x % Tl::channels;
    const int64_t d_in_group = pos.cblock * Tl::channels + c;
    if (d_in_group >= p.per_group) return;
    const int steps = chunk_steps(p, l0);
    float* row = map + image_start(p, pos) + d_in_group;
#pragma unroll
    for (int k = 0; k < kRowLoads; ++k) {
      const int t = threadIdx.x / Tl::channels + k * kStepThreads;
      if (t < steps) {
        atomicAdd(row_at(row, scanned_position(s, t), map_pitch<float>(p)),
                  tile_s[c * kRow + t]);
      }
    }
  }

  // Adds the tile's y (in s.dt) to the merged float32 map.
  __device__ static void store_y(const ScanParams& p, const BlockPos& pos,
                                 int64_t l0, const TileSmem& s) {
    add_to_map(p, pos, l0, static_cast<float*>(p.y), s.dt, s);
  }

  // Adds du (in s.u) to the merged float32 map; adds the gradient of dt_low
  // (d dt_low[t] = sum_c dd[c][t] W[c], over the block's channels) into
  // dx_dbl; accumulates d dt_weight (dW[c] += sum_t dd[c][t] dt_low[t]). dd
  // (in s.dt) holds d(step size) before the softplus, zero past L and for
  // padding channels.
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const TileSmem& s, float* extra) {
    const float* dd_s = s.dt;
    add_to_map(p, pos, l0, static_cast<float*>(p.du), s.u, s);
    const float* w_s = weights(extra);
    const float* dtl_s = dt_low(extra, p);
    float* dw_s = weight_grads(extra, p);
    const int steps = chunk_steps(p, l0);
    float* x_rows = p.dx_dbl + x_image_start(p, pos) +
                    static_cast<int>(pos.g) * (p.rank + 2 * p.d_state);
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
        const int at = scanned_position(s, t + h * kHalf);
        rows[h] = t + h * kHalf < steps ? row_at(x_rows, at, row_pitch<float>(p)) : nullptr;
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
  // `grads`, see sum_state_grad) into dx_dbl. A warp takes the values of a
  // step (one row of x_dbl): thread value j = threadIdx % (2 states), the
  // dB of state j or the dC of state j - states, steps threadIdx / (2
  // states) + 4 i.
  __device__ static void store_state_grads(const ScanParams& p,
                                           const BlockPos& pos, int64_t l,
                                           const float* grads, const TileSmem& s) {
    constexpr int kValues = 2 * Tl::states;
    static_assert(kThreads % kValues == 0 && kPiece % (kThreads / kValues) == 0,
                  "whole steps a pass");
    const int j = threadIdx.x % kValues;
    const int n = j % Tl::states;
    if (n >= p.d_state) return;
    const int t0 = static_cast<int>(static_cast<uint64_t>(l) % kSteps);
    const int steps = p.length - l < kPiece ? static_cast<int>(p.length - l) : kPiece;
    float* column = p.dx_dbl + x_image_start(p, pos) +
                    static_cast<int>(pos.g) * (p.rank + 2 * p.d_state) + p.rank +
                    (j < Tl::states ? n : p.d_state + n);
#pragma unroll
    for (int t = threadIdx.x / kValues; t < kPiece; t += kThreads / kValues) {
      if (t < steps) {
        atomicAdd(row_at(column, scanned_position(s, t0 + t), row_pitch<float>(p)),
                  sum_state_grad<Q>(grads, t, j));
      }
    }
  }
};

}  // namespace scan_cuda
}  // namespace mmvmamba
