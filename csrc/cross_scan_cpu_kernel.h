// The CPU kernel of SS2D's fused four-direction scan (cross_scan_fwd),
// written once with GCC vector extensions and compiled once per instruction
// set: cross_scan_cpu_<isa>.cpp defines MMV_ISA (the namespace) and
// MMV_VEC_BYTES (32: 8 floats a vector, 64: 16) and includes this file,
// under a `#pragma GCC target` for the wider sets. Nothing here depends on
// torch or on another library's inline functions.
//
// The map is channels-last, so one vector holds `kLanes` channels of one
// position. A block of channels is scanned in each direction's order, the
// positions read by index; per step the kernel computes the step sizes
// softplus(bias + dt_weight @ dt_low) of its channels, updates the N states
// of each (in registers, N padded to 1, 2, 4, 8 or 16 with zero A, B, C) and
// adds <C, h> + D u to the output. The first direction writes the block's
// output, the other three add to it, so the four are summed without races
// or extra buffers.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cross_scan_cpu.h"

namespace mmvmamba::cpu::MMV_ISA {

namespace {

typedef float vf __attribute__((vector_size(MMV_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(MMV_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(MMV_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(MMV_VEC_BYTES / 2)));
constexpr int kLanes = MMV_VEC_BYTES / 4;
constexpr int kMaxStates = 16;  // kMaxCrossDState in scan.h
constexpr int kDirections = 4;

#define MMV_INLINE inline __attribute__((always_inline))

MMV_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

MMV_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

MMV_INLINE vf splat(float x) { return vf{} + x; }

MMV_INLINE float to_float(float x) { return x; }

MMV_INLINE float to_float(uint16_t bfloat16_bits) {
  const uint32_t wide = static_cast<uint32_t>(bfloat16_bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof(x));
  return x;
}

// `lanes` channels from p (all of a vector, or the last few of D; the rest
// zero), as float32.
MMV_INLINE vf load_lanes(const float* p, int lanes) {
  vf v = vf{};
  if (lanes == kLanes) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int i = 0; i < lanes; ++i) v[i] = p[i];
  }
  return v;
}

MMV_INLINE vf load_lanes(const uint16_t* p, int lanes) {
  vh bits = vh{};
  if (lanes == kLanes) {
    std::memcpy(&bits, p, sizeof(bits));
  } else {
    for (int i = 0; i < lanes; ++i) bits[i] = p[i];
  }
  const vu wide = __builtin_convertvector(bits, vu) << 16;
  vf v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

MMV_INLINE void store_lanes(float* p, vf v, int lanes) {
  if (lanes == kLanes) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int i = 0; i < lanes; ++i) p[i] = v[i];
  }
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^t, relative error < 2e-7: t = k + r with k the nearest integer, a
// degree-5 polynomial for 2^r on [-1/2, 1/2], times 2^k. The polynomial was
// fitted for this kernel (reweighted least squares in relative error) with
// its constant term pinned to 1: decays exp(dt A) close to 1 multiply into
// the state over many steps, so 2^r must carry no bias near r = 0.
MMV_INLINE vf vexp2(vf t) {
#if MMV_VEC_BYTES == 64
  // vscalefps makes p 2^k and handles the range (0 or inf beyond it).
  const vf k = (vf)_mm512_roundscale_ps(
      (__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  // t clamped to [-126, 127] (2^-126 ~ 1e-38 stands in for smaller
  // results); adding 1.5 * 2^23 rounds it to an integer, which the low bits
  // of the sum then hold.
  const vf lo = splat(-126.0f), hi = splat(127.0f);
  t = t > lo ? t : lo;
  t = t < hi ? t : hi;
  const vf shifted = t + 12582912.0f;
  const vf k = shifted - 12582912.0f;
#endif
  const vf r = t - k;
  vf p = splat(1.32200064e-3f);
  p = p * r + 9.67169646e-3f;
  p = p * r + 5.55088818e-2f;
  p = p * r + 2.40222380e-1f;
  p = p * r + 6.93146884e-1f;
  p = p * r + 1.0f;
#if MMV_VEC_BYTES == 64
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)k);
#else
  vi bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits + (127 - 0x4B400000)) << 23;  // (k + 127) << 23
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

MMV_INLINE vf vexp(vf x) { return vexp2(x * kLog2e); }

// softplus(x) as torch computes it (x above 20 passes through);
// log1p(e) = 2 atanh(e / (2 + e)) stays exact for tiny e = exp(-|x|).
MMV_INLINE vf vsoftplus(vf x) {
  const vf zero = vf{};
  const vf e = vexp(zero - (x < zero ? zero - x : x));
  const vf s = e / (2.0f + e);
  const vf s2 = s * s;
  vf p = splat(1.0f / 13.0f);
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const vf sp = (x > zero ? x : zero) + 2.0f * s * p;
  return x > 20.0f ? x : sp;
}

// Steps are taken in chunks of kChunkSteps: first the chunk's step sizes
// (independent of each other, so their long dependency chains of dt_weight
// @ dt_low and softplus overlap), then its recurrence.
constexpr int kChunkSteps = 16;

// A block's parameters for one direction, channel-major as the vectors need
// them, in caller scratch: dt_weight (R vectors), A log2(e) (kMaxStates
// vectors, zero past N), bias and D; `rows` holds a chunk's (dt_low, B, C)
// when x_dbl cannot be read in place (bfloat16, or N padded).
struct Block {
  float *weight, *A, *bias, *D, *rows;
};

int64_t row_floats(int64_t rank) { return rank + 2 * kMaxStates; }

Block carve(float* scratch, int64_t rank) {
  Block b;
  b.weight = scratch;
  b.A = b.weight + rank * kLanes;
  b.bias = b.A + kMaxStates * kLanes;
  b.D = b.bias + kLanes;
  b.rows = b.D + kLanes;
  return b;
}

void prepare_block(const CrossArgs& a, int k, int64_t c0, int lanes,
                   const Block& blk) {
  const int64_t R = a.rank, N = a.d_state;
  std::memset(blk.weight, 0, sizeof(float) * (R + kMaxStates + 2) * kLanes);
  for (int i = 0; i < lanes; ++i) {
    const int64_t d = k * a.d_inner + c0 + i;
    for (int64_t r = 0; r < R; ++r) blk.weight[r * kLanes + i] = a.dt_weight[d * R + r];
    for (int64_t n = 0; n < N; ++n) {
      blk.A[n * kLanes + i] = a.A[d * N + n] * kLog2e;
    }
    blk.bias[i] = a.dt_bias[d];
    blk.D[i] = a.D[d];
  }
}

// One direction of one channel block; NS = N rounded up to a power of two.
// A step's (dt_low, B, C) are read in place (float32 x_dbl and N = NS) or
// from blk.rows, each laid out (dt_low, B padded to NS, C padded to NS).
template <typename T, int NS>
void scan_direction(const CrossArgs& a, int k, int64_t c0, int lanes,
                    const Block& blk, bool accumulate) {
  const int64_t L = a.length, Dm = a.d_inner, R = a.rank, N = a.d_state;
  const int64_t stride = kDirections * (R + 2 * N);
  bool in_place = false;
  if constexpr (std::is_same_v<T, float>) in_place = N == NS;
  const T* u = static_cast<const T*>(a.u) + c0;
  const T* x_dbl = static_cast<const T*>(a.x_dbl) + k * (R + 2 * N);
  float* out = a.out + c0;
  const int32_t* order = a.orders + (k & 1) * L;
  const bool reverse = k >= 2;
  vf A[NS], h[NS];
#pragma GCC unroll 16
  for (int n = 0; n < NS; ++n) {
    A[n] = load(blk.A + n * kLanes);
    h[n] = vf{};
  }
  const vf bias = load(blk.bias), D = load(blk.D);
  if (!in_place) {
    std::memset(blk.rows, 0, sizeof(float) * kChunkSteps * row_floats(R));
  }
  vf dts[kChunkSteps], dtus[kChunkSteps], skips[kChunkSteps];
  const float* rows[kChunkSteps];
  int64_t offsets[kChunkSteps];
  for (int64_t i0 = 0; i0 < L; i0 += kChunkSteps) {
    const int steps = static_cast<int>(L - i0 < kChunkSteps ? L - i0 : kChunkSteps);
    for (int t = 0; t < steps; ++t) {
      const int64_t i = i0 + t;
      const int64_t pos = order[reverse ? L - 1 - i : i];
      const T* src = x_dbl + pos * stride;
      const float* row;
      if constexpr (std::is_same_v<T, float>) row = src;
      if (!in_place) {
        float* copy = blk.rows + t * row_floats(R);
        for (int64_t j = 0; j < R + N; ++j) copy[j] = to_float(src[j]);
        for (int64_t n = 0; n < N; ++n) copy[R + NS + n] = to_float(src[R + N + n]);
        row = copy;
      }
      vf delta0 = bias, delta1 = vf{};
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) {
        delta0 += load(blk.weight + r * kLanes) * row[r];
        delta1 += load(blk.weight + (r + 1) * kLanes) * row[r + 1];
      }
      if (r < R) delta0 += load(blk.weight + r * kLanes) * row[r];
      const vf dt = vsoftplus(delta0 + delta1);
      const vf uv = load_lanes(u + pos * Dm, lanes);
      dts[t] = dt;
      dtus[t] = dt * uv;
      skips[t] = D * uv;
      rows[t] = row;
      offsets[t] = pos * Dm;
    }
    for (int t = 0; t < steps; ++t) {
      const vf dt = dts[t], dtu = dtus[t];
      const float* B = rows[t] + R;
      const float* C = B + NS;
      vf y0 = skips[t], y1 = vf{};
#pragma GCC unroll 16
      for (int n = 0; n < NS; ++n) {
        h[n] = vexp2(A[n] * dt) * h[n] + dtu * B[n];
        if (n % 2 == 0) {
          y0 += C[n] * h[n];
        } else {
          y1 += C[n] * h[n];
        }
      }
      vf y = y0 + y1;
      if (accumulate) y += load_lanes(out + offsets[t], lanes);
      store_lanes(out + offsets[t], y, lanes);
    }
  }
}

template <typename T, int NS>
void forward_block(const CrossArgs& a, int64_t c0, const Block& blk) {
  const int lanes = static_cast<int>(
      a.d_inner - c0 < kLanes ? a.d_inner - c0 : kLanes);
  for (int k = 0; k < kDirections; ++k) {
    prepare_block(a, k, c0, lanes, blk);
    scan_direction<T, NS>(a, k, c0, lanes, blk, /*accumulate=*/k > 0);
  }
}

template <typename T>
void forward_block_t(const CrossArgs& a, int64_t c0, const Block& blk) {
  const int64_t N = a.d_state;
  if (N <= 1) return forward_block<T, 1>(a, c0, blk);
  if (N <= 2) return forward_block<T, 2>(a, c0, blk);
  if (N <= 4) return forward_block<T, 4>(a, c0, blk);
  if (N <= 8) return forward_block<T, 8>(a, c0, blk);
  return forward_block<T, 16>(a, c0, blk);
}

}  // namespace

int cross_lanes() { return kLanes; }

int64_t cross_scratch_floats(int64_t rank) {
  // weight, A, bias, D, then a chunk's rows.
  return (rank + kMaxStates + 2) * kLanes + kChunkSteps * row_floats(rank);
}

void cross_forward_block(const CrossArgs& a, int64_t c0, float* scratch) {
  const Block blk = carve(scratch, a.rank);
  if (a.bf16) {
    forward_block_t<uint16_t>(a, c0, blk);
  } else {
    forward_block_t<float>(a, c0, blk);
  }
}

}  // namespace mmvmamba::cpu::MMV_ISA
