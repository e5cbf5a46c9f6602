// The fused four-direction scan for N = 1: kernels and launch code
// (cross_scan_n1.cuh describes the design).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cross_layout.cuh"
#include "cross_scan_n1.cuh"
#include "scan_launch.cuh"

namespace mmvmamba {
namespace scan_cuda {
namespace {

constexpr int kN1MaxWarps = 4;                   // warps per block at most
constexpr int kN1Group = 16;                     // steps per register group
constexpr int kN1Groups = kSteps / kN1Group;     // groups per chunk
constexpr int kN1StageRegs = 8;                  // x_dbl values a thread prefetches
// Register budgets (blocks of 4 warps per SM): at most 102 (forward) and
// 170 (backward) registers.
constexpr int kN1FwdBlocksPerSm = 5;
constexpr int kN1BwdBlocksPerSm = 3;
constexpr const char* kN1Env = "MMVMAMBA_SCAN_N1";
static_assert(kN1Group == 16 && kSteps % kN1Group == 0,
              "the dB / dC butterfly sums 2 x 16 values over 32 lanes");

// A block's shared memory, in floats (every region 16-byte aligned):
// x_s, `buffers` chunks of x_dbl rows [pitch + 2][kSteps] (dt_low, zero
// rows up to the rank pitch (R rounded up to 4), B, C); w_s,
// dt_weight rows of the block's channels [threads][pitch] (zero-padded);
// pos_s, the offsets of the chunks' steps [2][buffers][kSteps]: positions
// times D (in a (batch, L, D) map), then times 4 (R + 2) (in x_dbl). The backward
// adds h_s, the states at the pieces' starts [kN1Groups][threads]; dw_s,
// d dt_weight [R][threads]; dd_s, a piece's d(step size) before the
// softplus [kN1Group][threads]; red_s, the d dt_low partial sums
// [splits][kN1Group][pitch]; bc_s, the warps' dB / dC sums [warps][32].
struct N1Smem {
  int x_rows, threads, rank, pitch, buffers;

  __host__ __device__ int x_buffer() const { return x_rows * kSteps; }
  __host__ __device__ int w() const { return buffers * x_buffer(); }
  __host__ __device__ int pos() const { return w() + threads * pitch; }
  __host__ __device__ int fwd_end() const { return pos() + 2 * buffers * kSteps; }
  __host__ __device__ int h() const { return fwd_end(); }
  __host__ __device__ int dw() const { return h() + kN1Groups * threads; }
  __host__ __device__ int dd() const { return dw() + rank * threads; }
  __host__ __device__ int red() const { return dd() + kN1Group * threads; }
  __host__ __device__ int bc() const {
    return red() + kN1Group * (threads > pitch ? threads : pitch);
  }
  __host__ __device__ int bwd_end() const { return bc() + threads; }
};

__host__ __device__ inline N1Smem n1_smem(const ScanParams& p, int threads,
                                          bool backward) {
  return N1Smem{p.dt_pitch + 2, threads, p.rank, p.dt_pitch, backward ? 1 : 2};
}

// The block's (batch, direction, channel block).
struct N1Pos {
  int64_t b;
  int g, cblock;
};

__device__ __forceinline__ N1Pos n1_pos(const ScanParams& p) {
  const int64_t blk = blockIdx.x;
  N1Pos pos;
  pos.cblock = static_cast<int>(blk % p.channel_blocks);
  pos.g = static_cast<int>((blk / p.channel_blocks) % kDirections);
  pos.b = blk / (static_cast<int64_t>(p.channel_blocks) * kDirections);
  return pos;
}

// Staging of one chunk's x_dbl rows and positions by the block's first
// kSteps threads, one step each: fetch() computes the step's position and
// issues the loads of its first kN1StageRegs values (dt_low ranks, then B,
// C) into registers, in flight while the previous chunk is scanned;
// store() writes them to the [pitch + 2][kSteps] tile (value j < R to row
// j, B and C to rows pitch and pitch + 1, zeros between), loads the rest
// and writes the step's offsets in the map and in x_dbl. Past L: zeros,
// offsets 0.
template <typename T>
struct N1Stage {
  float v[kN1StageRegs];
  const T* row;  // the step's x_dbl values of the block's direction
  bool ok;       // the step is before L

  __device__ void fetch(const ScanParams& p, const N1Pos& at, int chunk) {
    if (threadIdx.x >= kSteps) return;
    const int l = chunk * kSteps + threadIdx.x;
    ok = l < p.length;
    const int position =
        ok ? cross_position(at.g, l, p.height, p.width, p.inv_height) : 0;
    row = static_cast<const T*>(p.delta) +
          (at.b * p.length + position) * p.row_stride + at.g * (p.rank + 2);
#pragma unroll
    for (int j = 0; j < kN1StageRegs; ++j) {
      v[j] = ok && j < p.rank + 2 ? static_cast<float>(row[j]) : 0.0f;
    }
  }

  __device__ void store(const ScanParams& p, const N1Pos& at, int chunk,
                        float* x_s, int* map_off, int* x_off) const {
    if (threadIdx.x >= kSteps) return;
    const int t = threadIdx.x;
    const int rank = p.rank, values = rank + 2, shift = p.dt_pitch - rank;
#pragma unroll
    for (int j = 0; j < kN1StageRegs; ++j) {
      if (j < values) x_s[(j < rank ? j : j + shift) * kSteps + t] = v[j];
    }
    for (int j = kN1StageRegs; j < values; ++j) {
      x_s[(j < rank ? j : j + shift) * kSteps + t] =
          ok ? static_cast<float>(row[j]) : 0.0f;
    }
    for (int j = rank; j < p.dt_pitch; ++j) x_s[j * kSteps + t] = 0.0f;
    const int position =
        ok ? cross_position(at.g, chunk * kSteps + t, p.height, p.width, p.inv_height)
           : 0;
    map_off[t] = position * static_cast<int>(p.per_group);
    x_off[t] = position * p.row_stride;
  }
};

// dt_weight rows of the block's channels, zero for padding channels and
// ranks (w_s[c * pitch + r]).
__device__ __forceinline__ void n1_load_weights(const ScanParams& p,
                                                const N1Pos& at, float* w_s) {
  const int threads = blockDim.x, pitch = p.dt_pitch;
  for (int i = threadIdx.x; i < threads * pitch; i += threads) {
    const int c = i / pitch, r = i % pitch;
    const int64_t d = static_cast<int64_t>(at.cblock) * threads + c;
    w_s[i] = d < p.per_group && r < p.rank
                 ? p.dt_weight[(at.g * p.per_group + d) * p.rank + r]
                 : 0.0f;
  }
}

// The thread's values of kN1Group steps from step l of a (batch, L, D) map
// (`map` at the thread's batch element and channel, channel 0 for padding
// channels), at the offsets `off`. kGuard: zero past L and for padding
// channels; else whatever is there (offset 0 past L: always a valid
// address), for callers that use no such value.
template <bool kGuard, typename T, typename V>
__device__ __forceinline__ void n1_load(V (&dst)[kN1Group], const T* map,
                                        const int* off, int l, int length, bool valid) {
#pragma unroll
  for (int i = 0; i < kN1Group; ++i) {
    if constexpr (kGuard) {
      dst[i] = valid && l + i < length ? static_cast<V>(map[off[i]]) : static_cast<V>(0.0f);
    } else {
      dst[i] = static_cast<V>(map[off[i]]);
    }
  }
}

// x[i] = bias + sum_r w_row[r] dt_low[t0 + i][r] (ranks in order, as the
// generic kernel sums them; the padding ranks add zeros), 4 steps a float4
// read.
__device__ __forceinline__ void n1_projection(float (&x)[kN1Group], float bias,
                                              const float* w_row, const float* x_s,
                                              int t0, int pitch) {
#pragma unroll
  for (int i = 0; i < kN1Group; ++i) x[i] = bias;
  for (int r0 = 0; r0 < pitch; r0 += 4) {
    const float4 w4 = *reinterpret_cast<const float4*>(w_row + r0);
    const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4* row = reinterpret_cast<const float4*>(x_s + (r0 + j) * kSteps + t0);
#pragma unroll
      for (int q = 0; q < kN1Group / 4; ++q) {
        const float4 v = row[q];
        x[4 * q] = fmaf(wv[j], v.x, x[4 * q]);
        x[4 * q + 1] = fmaf(wv[j], v.y, x[4 * q + 1]);
        x[4 * q + 2] = fmaf(wv[j], v.z, x[4 * q + 2]);
        x[4 * q + 3] = fmaf(wv[j], v.w, x[4 * q + 3]);
      }
    }
  }
}

// The derivative of softplus at x (the logistic function).
__device__ __forceinline__ float n1_sigmoid(float x) {
  const float e = __expf(-fabsf(x));
  const float inv = __fdividef(1.0f, 1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

// Sums 32 values per lane (vb[0..15], vc[0..15]) over the warp: a butterfly
// that halves the values each stage; lane j ends with the sum of value j.
__device__ __forceinline__ float n1_warp_sums(const float (&vb)[kN1Group],
                                              const float (&vc)[kN1Group]) {
  float v[2 * kN1Group];
#pragma unroll
  for (int i = 0; i < kN1Group; ++i) {
    v[i] = vb[i];
    v[kN1Group + i] = vc[i];
  }
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int stage = 0; stage < 5; ++stage) {
    const int mask = 16 >> stage, half = 16 >> stage;
    const bool upper = (lane & mask) != 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if (i < half) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
      }
    }
  }
  return v[0];
}

// Forward: y (added into the float32 map) and the checkpoints.
template <typename T>
__global__ void __launch_bounds__(kN1MaxWarps * 32, kN1FwdBlocksPerSm)
    n1_fwd_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  const int threads = blockDim.x, tid = threadIdx.x;
  const N1Smem lay = n1_smem(p, threads, false);
  float* x_s = smem;
  float* w_s = smem + lay.w();
  int* pos_s = reinterpret_cast<int*>(smem + lay.pos());  // map offsets
  int* xo_s = pos_s + 2 * kSteps;                           // (unused here)
  const int pitch = p.dt_pitch;
  const int length = static_cast<int>(p.length), chunks = static_cast<int>(p.chunks);
  const int d_inner = static_cast<int>(p.per_group);

  const N1Pos at = n1_pos(p);
  const int d = at.cblock * threads + tid;
  const bool valid = d < d_inner;
  const int64_t ch = static_cast<int64_t>(at.g) * d_inner + (valid ? d : 0);
  const float a = valid ? p.A[ch] * kLog2e : 0.0f;
  const float d_skip = valid ? p.D[ch] : 0.0f;
  const float bias = valid ? p.delta_bias[ch] : 0.0f;
  const int64_t map_base = at.b * p.length * d_inner + (valid ? d : 0);
  const T* u = static_cast<const T*>(p.u) + map_base;
  float* y = static_cast<float*>(p.y) + map_base;
  float* saved = p.checkpoints + (at.b * p.channels + ch) * p.chunks;
  const float* w_row = w_s + tid * pitch;

  n1_load_weights(p, at, w_s);
  N1Stage<T> stage;
  stage.fetch(p, at, 0);
  stage.store(p, at, 0, x_s, pos_s, xo_s);
  __syncthreads();
  T uc[kN1Group], un[kN1Group];
  n1_load<false>(uc, u, pos_s, 0, length, valid);
  float h = 0.0f;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int buf = chunk & 1;
    const float* xb = x_s + buf * lay.x_buffer();
    const int* pb = pos_s + buf * kSteps;
    float* x_next = x_s + (buf ^ 1) * lay.x_buffer();
    int* pos_next = pos_s + (buf ^ 1) * kSteps;
    const int l0 = chunk * kSteps;
    const int steps = min(kSteps, length - l0);
    const bool more = chunk + 1 < chunks;
#pragma unroll 1
    for (int k = 0; k < kN1Groups; ++k) {
      const int t0 = k * kN1Group;
      // The next chunk's x_dbl flies during group kN1Groups - 2 and is stored
      // before the last group (whose loads of u need its positions); the
      // first barrier: every thread is done with the buffer it overwrites.
      if (k == kN1Groups - 2 && more) stage.fetch(p, at, chunk + 1);
      if (k == kN1Groups - 1) {
        __syncthreads();
        if (more) stage.store(p, at, chunk + 1, x_next, pos_next, xo_s + (buf ^ 1) * kSteps);
        __syncthreads();
      }
      if (k + 1 < kN1Groups) {
        n1_load<false>(un, u, pb + t0 + kN1Group, l0 + t0 + kN1Group, length, valid);
      } else if (more) {
        n1_load<false>(un, u, pos_next, l0 + kSteps, length, valid);
      }
      float x[kN1Group];
      n1_projection(x, bias, w_row, xb, t0, pitch);
      const float* B_s = xb + pitch * kSteps + t0;
      const float* C_s = B_s + kSteps;
      const auto step = [&](int i) {
        const float dt = softplus(x[i]);
        const float uv = static_cast<float>(uc[i]);
        h = exp2f(a * dt) * h + dt * uv * B_s[i];
        if (valid) atomicAdd(y + pb[t0 + i], C_s[i] * h + d_skip * uv);
      };
      if (t0 + kN1Group <= steps) {
#pragma unroll
        for (int i = 0; i < kN1Group; ++i) step(i);
      } else {
        // The sequence's last group: steps past L are skipped.
#pragma unroll
        for (int i = 0; i < kN1Group; ++i) {
          if (t0 + i < steps) step(i);
        }
      }
#pragma unroll
      for (int i = 0; i < kN1Group; ++i) uc[i] = un[i];
    }
    if (valid) saved[chunk] = h;
  }
}

// Backward: du and dx_dbl (float32 maps, added into), d dt_weight,
// d dt_bias, dA, dD.
template <typename T>
__global__ void __launch_bounds__(kN1MaxWarps * 32, kN1BwdBlocksPerSm)
    n1_bwd_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  const int threads = blockDim.x, tid = threadIdx.x;
  const int warp = tid / 32, warps = threads / 32;
  const N1Smem lay = n1_smem(p, threads, true);
  float* x_s = smem;
  float* w_s = smem + lay.w();
  int* pos_s = reinterpret_cast<int*>(smem + lay.pos());  // map offsets
  int* xo_s = pos_s + kSteps;                               // x_dbl offsets
  float* h_s = smem + lay.h();
  float* dw_s = smem + lay.dw();
  float* dd_s = smem + lay.dd();
  float* red_s = smem + lay.red();
  float* bc_s = smem + lay.bc();
  const int rank = p.rank, pitch = p.dt_pitch;
  const int length = static_cast<int>(p.length), chunks = static_cast<int>(p.chunks);
  const int d_inner = static_cast<int>(p.per_group);

  const N1Pos at = n1_pos(p);
  const int d = at.cblock * threads + tid;
  const bool valid = d < d_inner;
  const int64_t ch = static_cast<int64_t>(at.g) * d_inner + (valid ? d : 0);
  const float A = valid ? p.A[ch] : 0.0f;
  const float a = A * kLog2e;
  const float d_skip = valid ? p.D[ch] : 0.0f;
  const float bias = valid ? p.delta_bias[ch] : 0.0f;
  const int64_t map_base = at.b * p.length * d_inner + (valid ? d : 0);
  const T* u = static_cast<const T*>(p.u) + map_base;
  const float* dy = static_cast<const float*>(p.dy) + map_base;
  float* du = static_cast<float*>(p.du) + map_base;
  float* dx = p.dx_dbl + at.b * p.length * p.row_stride + at.g * (rank + 2);
  const float* saved = p.checkpoints + (at.b * p.channels + ch) * p.chunks;
  const float* w_row = w_s + tid * pitch;
  // The d dt_low product's split of the block's channels (see below).
  const int tiles = pitch;  // 4 step quads x pitch / 4 rank quads
  const int splits = threads / tiles > 1 ? threads / tiles : 1;
  const int per_split = (threads + splits - 1) / splits;

  n1_load_weights(p, at, w_s);
  for (int i = tid; i < rank * threads; i += threads) dw_s[i] = 0.0f;
  // dh enters each step as decay_next * dh (zero after the last step).
  float dh = 0.0f, decay_next = 0.0f, dA = 0.0f, dD = 0.0f, dbias = 0.0f;
  N1Stage<T> stage;
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    const int l0 = chunk * kSteps;
    const int steps = min(kSteps, length - l0);
    const int pieces = (steps + kN1Group - 1) / kN1Group;
    __syncthreads();  // the previous chunk's reads of x_s / pos_s are done
    stage.fetch(p, at, chunk);
    stage.store(p, at, chunk, x_s, pos_s, xo_s);
    __syncthreads();
    const float* B_all = x_s + pitch * kSteps;
    const float* C_all = B_all + kSteps;

    // Pass 1: the states at the pieces' starts, from the chunk's checkpoint.
    {
      float h = chunk > 0 && valid ? saved[chunk - 1] : 0.0f;
      h_s[tid] = h;
#pragma unroll 1
      for (int k = 0; k + 1 < pieces; ++k) {
        const int t0 = k * kN1Group;
        T uv[kN1Group];
        n1_load<true>(uv, u, pos_s + t0, l0 + t0, length, valid);
        float x[kN1Group];
        n1_projection(x, bias, w_row, x_s, t0, pitch);
#pragma unroll
        for (int i = 0; i < kN1Group; ++i) {
          // Whole pieces only here: t0 + i < steps.
          const float dt = softplus(x[i]);
          h = exp2f(a * dt) * h + dt * static_cast<float>(uv[i]) * B_all[t0 + i];
        }
        h_s[(k + 1) * threads + tid] = h;
      }
    }

    // Pass 2: pieces in reverse; their states, then the reverse scan.
#pragma unroll 1
    for (int k = pieces - 1; k >= 0; --k) {
      const int t0 = k * kN1Group;
      const float* B_s = B_all + t0;
      const float* C_s = C_all + t0;
      const int* pb = pos_s + t0;
      const int* xb = xo_s + t0;
      T uv[kN1Group];
      float gy[kN1Group];
      n1_load<true>(uv, u, pb, l0 + t0, length, valid);
      n1_load<true>(gy, dy, pb, l0 + t0, length, valid);
      float dt[kN1Group];
      n1_projection(dt, bias, w_row, x_s, t0, pitch);
      float hs[kN1Group], sig[kN1Group];
      const float h0 = h_s[k * threads + tid];
      {
        float h = h0;
#pragma unroll
        for (int i = 0; i < kN1Group; ++i) {
          if (t0 + i < steps) {
            const float x = dt[i];
            dt[i] = softplus(x);
            sig[i] = n1_sigmoid(x);
            h = exp2f(a * dt[i]) * h + dt[i] * static_cast<float>(uv[i]) * B_s[i];
          } else {
            dt[i] = sig[i] = 0.0f;
          }
          hs[i] = h;
        }
      }
      float vb[kN1Group], vc[kN1Group];
#pragma unroll
      for (int i = kN1Group - 1; i >= 0; --i) {
        float ddt = 0.0f;
        vb[i] = vc[i] = 0.0f;
        if (t0 + i < steps) {
          const float uf = static_cast<float>(uv[i]), g = gy[i];
          dh = g * C_s[i] + decay_next * dh;
          const float decay = exp2f(a * dt[i]);
          decay_next = decay;
          const float prev = i > 0 ? hs[i - 1] : h0;
          const float w = dh * decay * prev;  // dh_l dA_l h_{l-1}
          dA += dt[i] * w;
          const float sum_b = dh * B_s[i];
          ddt = (sum_b * uf + A * w) * sig[i];
          dbias += ddt;
          dD += g * uf;
          if (valid) {
            atomicAdd(du + pb[i], sum_b * dt[i] + d_skip * g);
          }
          vb[i] = dh * (dt[i] * uf);
          vc[i] = g * hs[i];
        }
        dd_s[i * threads + tid] = ddt;
      }
      // dB / dC of the piece's steps summed over the warp: lane j holds
      // dB of step t0 + j (j < 16) or dC of step t0 + j - 16.
      bc_s[warp * 32 + tid % 32] = n1_warp_sums(vb, vc);
      // d dt_weight[c][r] += sum_t ddt[t] dt_low[t][r] (own column of dd_s).
      {
        float dd[kN1Group];
#pragma unroll
        for (int i = 0; i < kN1Group; ++i) dd[i] = dd_s[i * threads + tid];
        for (int r = 0; r < rank; ++r) {
          const float4* row = reinterpret_cast<const float4*>(x_s + r * kSteps + t0);
          float s = 0.0f;
#pragma unroll
          for (int q = 0; q < kN1Group / 4; ++q) {
            const float4 v = row[q];
            s = fmaf(dd[4 * q], v.x, s);
            s = fmaf(dd[4 * q + 1], v.y, s);
            s = fmaf(dd[4 * q + 2], v.z, s);
            s = fmaf(dd[4 * q + 3], v.w, s);
          }
          dw_s[r * threads + tid] += s;
        }
      }
      __syncthreads();
      // dB / dC into dx_dbl, summed over the warps (bc_s is read before the
      // next barrier: the next piece overwrites it after that).
      if (tid < 32 && t0 + tid % kN1Group < steps) {
        float s = 0.0f;
        for (int w = 0; w < warps; ++w) s += bc_s[w * 32 + tid];
        atomicAdd(dx + xb[tid % kN1Group] + rank + tid / kN1Group, s);
      }
      // d dt_low[t][r] = sum_c ddt[t][c] w[c][r] over the block's channels:
      // items (4 steps x 4 ranks tile, channel split), partial sums in red_s.
      for (int item = tid; item < tiles * splits; item += threads) {
        const int tile = item % tiles, split = item / tiles;
        const int tq = tile % 4, rq = tile / 4;
        float acc[4][4] = {};
        const int c_end = min(threads, (split + 1) * per_split);
        for (int c = split * per_split; c < c_end; ++c) {
          const float4 w = *reinterpret_cast<const float4*>(w_s + c * pitch + 4 * rq);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float v = dd_s[(4 * tq + i) * threads + c];
            acc[i][0] = fmaf(v, w.x, acc[i][0]);
            acc[i][1] = fmaf(v, w.y, acc[i][1]);
            acc[i][2] = fmaf(v, w.z, acc[i][2]);
            acc[i][3] = fmaf(v, w.w, acc[i][3]);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          *reinterpret_cast<float4*>(red_s + (split * kN1Group + 4 * tq + i) * pitch +
                                     4 * rq) =
              make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        }
      }
      __syncthreads();
      // d dt_low into dx_dbl, summed over the splits.
      for (int o = tid; o < kN1Group * rank; o += threads) {
        const int t = o / rank, col = o % rank;
        float s = 0.0f;
        for (int sp = 0; sp < splits; ++sp) s += red_s[(sp * kN1Group + t) * pitch + col];
        if (t0 + t < steps) atomicAdd(dx + xb[t] + col, s);
      }
    }
  }
  __syncthreads();
  if (valid) {
    atomicAdd(p.dA + ch, dA);
    atomicAdd(p.dD + ch, dD);
    atomicAdd(p.ddelta_bias + ch, dbias);
  }
  for (int i = tid; i < threads * rank; i += threads) {
    const int c = i / rank, r = i % rank;
    const int64_t dc = static_cast<int64_t>(at.cblock) * threads + c;
    if (dc < d_inner) {
      atomicAdd(p.ddt_weight + (at.g * p.per_group + dc) * rank + r,
                dw_s[r * threads + c]);
    }
  }
}

// Block shape: the fewest blocks of at most kN1MaxWarps warps that cover
// the channels, balanced (D = 96: one block of 3 warps; 192: two of 3),
// at least 2 warps.
struct N1Block {
  int threads, channel_blocks;
};

N1Block n1_block(int64_t d_inner) {
  // At least kSteps threads: they stage the chunks.
  const int64_t warps_needed = std::max<int64_t>(ceil_div(d_inner, 32), kSteps / 32);
  const int64_t blocks = ceil_div(warps_needed, kN1MaxWarps);
  const int64_t warps = ceil_div(warps_needed, blocks);
  return {static_cast<int>(32 * warps), static_cast<int>(blocks)};
}

// MMVMAMBA_SCAN_N1: -1 (automatic) when unset, empty or "auto", else 0 / 1.
int n1_mode() {
  const char* value = std::getenv(kN1Env);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return -1;
  if (std::strcmp(value, "0") == 0) return 0;
  if (std::strcmp(value, "1") == 0) return 1;
  TORCH_CHECK(false, kN1Env, " must be 0 (never use the N = 1 scan kernels), 1 "
              "(always, for d_state 1) or auto (unset: when the launch fills the "
              "GPU); got '", value, "'");
  return -1;
}

int n1_smem_bytes(const ScanParams& p, int threads, bool backward) {
  const N1Smem lay = n1_smem(p, threads, backward);
  return (backward ? lay.bwd_end() : lay.fwd_end()) * static_cast<int>(sizeof(float));
}

}  // namespace

bool use_n1(const ScanParams& p, bool backward) {
  if (p.d_state != 1) return false;
  const int mode = n1_mode();
  // Offsets within a batch element's map and x_dbl are 32-bit.
  if (mode == 0 || p.length * p.per_group > INT32_MAX ||
      p.length * p.row_stride > INT32_MAX) {
    return false;
  }
  const N1Block blk = n1_block(p.per_group);
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (n1_smem_bytes(p, blk.threads, backward) > max_smem) return false;
  if (mode == 1) return true;
  const int64_t warps = p.batch * kDirections * ceil_div(p.per_group, 32);
  return warps >= int64_t{kN1MinWarpsPerSm} * device_sms();
}

template <typename T>
void launch_n1(ScanParams& p, bool backward) {
  const N1Block blk = n1_block(p.per_group);
  p.channel_blocks = blk.channel_blocks;
  p.seg_chunks = static_cast<int>(p.chunks);
  p.segments = 1;
  const int64_t blocks = p.batch * kDirections * blk.channel_blocks;
  TORCH_CHECK(blocks <= INT32_MAX, "cross_scan: batch x channels too large for "
              "one launch (", std::to_string(blocks), " blocks)");
  const int smem = n1_smem_bytes(p, blk.threads, backward);
  void (*kernel)(ScanParams) = backward ? n1_bwd_kernel<T> : n1_fwd_kernel<T>;
  allow_shared_bytes(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<static_cast<unsigned>(blocks), blk.threads, smem,
           c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_n1<float>(ScanParams& p, bool backward);
template void launch_n1<c10::Half>(ScanParams& p, bool backward);
template void launch_n1<c10::BFloat16>(ScanParams& p, bool backward);

}  // namespace scan_cuda
}  // namespace mmvmamba
