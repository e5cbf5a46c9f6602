// The CPU kernels of SS2D's fused four-direction scan (cross_scan_fwd /
// _bwd), written once with GCC vector extensions and compiled once per
// instruction
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
// or extra buffers. The backward (backward_direction) recomputes the states
// chunk by chunk and sums the gradients of B, C and dt_low over the
// channels with a shuffle tree.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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

// softplus and sigmoid over this kernel's vexp.
#include "cpu_vec_softplus.h"

// Steps are taken in chunks of kChunkSteps: first the chunk's step sizes
// (independent of each other, so their long dependency chains of dt_weight
// @ dt_low and softplus overlap), then its recurrence.
constexpr int kChunkSteps = 16;

// A block's parameters for one direction, channel-major as the vectors need
// them, in caller scratch (aligned to a vector): dt_weight (R vectors), A
// log2(e) and A (kMaxStates vectors each, zero past N), bias and D. The
// backward adds the gradient sums of dt_weight (R vectors), room for one
// step's lane sums (R + 2N vectors, padded) and the state at the start of
// every chunk. Last, `rows` holds a chunk's (dt_low, B, C) when x_dbl
// cannot be read in place (N padded).
struct Block {
  float *weight, *A_log2, *A, *bias, *D, *dweight, *sums, *starts, *rows;
};

int64_t row_floats(int64_t rank) { return rank + 2 * kMaxStates; }

int64_t chunks_of(int64_t length) {
  return (length + kChunkSteps - 1) / kChunkSteps;
}

int64_t sum_vectors(int64_t rank) {
  return (rank + 2 * kMaxStates + kLanes - 1) / kLanes * kLanes;
}

// Vectors of scratch before the rows.
int64_t block_vectors(int64_t rank, int64_t length, bool backward) {
  const int64_t params = rank + 2 * kMaxStates + 2;
  return backward ? params + rank + sum_vectors(rank) +
                        chunks_of(length) * kMaxStates
                  : params;
}

Block carve(float* scratch, int64_t rank, int64_t length, bool backward) {
  Block b;
  b.weight = scratch;
  b.A_log2 = b.weight + rank * kLanes;
  b.A = b.A_log2 + kMaxStates * kLanes;
  b.bias = b.A + kMaxStates * kLanes;
  b.D = b.bias + kLanes;
  b.dweight = b.D + kLanes;
  b.sums = b.dweight + (backward ? rank * kLanes : 0);
  b.starts = b.sums + (backward ? sum_vectors(rank) * kLanes : 0);
  b.rows = scratch + block_vectors(rank, length, backward) * kLanes;
  return b;
}

void prepare_block(const CrossArgs& a, int k, int64_t c0, int lanes,
                   const Block& blk) {
  const int64_t R = a.rank, N = a.d_state;
  std::memset(blk.weight, 0,
              sizeof(float) * (R + 2 * kMaxStates + 2) * kLanes);
  for (int i = 0; i < lanes; ++i) {
    const int64_t d = k * a.d_inner + c0 + i;
    for (int64_t r = 0; r < R; ++r) blk.weight[r * kLanes + i] = a.dt_weight[d * R + r];
    for (int64_t n = 0; n < N; ++n) {
      blk.A[n * kLanes + i] = a.A[d * N + n];
      blk.A_log2[n * kLanes + i] = a.A[d * N + n] * kLog2e;
    }
    blk.bias[i] = a.dt_bias[d];
    blk.D[i] = a.D[d];
  }
}

// One direction of one channel block; NS = N rounded up to a power of two.
// A step's (dt_low, B, C) are read in place (N = NS) or from blk.rows, each
// laid out (dt_low, B padded to NS, C padded to NS).
template <typename T, int NS>
struct Direction {
  const CrossArgs& a;
  const Block& blk;
  int k, lanes;
  int64_t L, Dm, R, N, stride;
  bool in_place, reverse;
  const T* u;
  const float* x_dbl;
  const int32_t* order;

  Direction(const CrossArgs& args, const Block& block, int direction,
            int64_t c0, int lanes_)
      : a(args), blk(block), k(direction), lanes(lanes_) {
    L = a.length;
    Dm = a.d_inner;
    R = a.rank;
    N = a.d_state;
    stride = kDirections * (R + 2 * N);
    in_place = N == NS;
    reverse = k >= 2;
    u = static_cast<const T*>(a.u) + c0;
    x_dbl = a.x_dbl + k * (R + 2 * N);
    order = a.orders + (k & 1) * L;
    if (!in_place) {
      std::memset(blk.rows, 0, sizeof(float) * kChunkSteps * row_floats(R));
    }
  }

  // Row-major position of step i.
  int64_t position(int64_t i) const { return order[reverse ? L - 1 - i : i]; }
};

// A chunk's per-step values: step sizes, dt u, D u, the (dt_low, B, C) row
// and the offset of the position in a (L, D) map; the backward adds u and
// the derivative of the softplus.
template <bool kBackward>
struct Chunk {
  int steps;
  vf dt[kChunkSteps], dtu[kChunkSteps], skip[kChunkSteps];
  vf u[kBackward ? kChunkSteps : 1], slope[kBackward ? kChunkSteps : 1];
  const float* rows[kChunkSteps];
  int64_t positions[kChunkSteps], offsets[kChunkSteps];
};

// The step values of steps [i0, i0 + steps): independent of each other, so
// the long dependency chains of dt_weight @ dt_low and softplus overlap.
template <typename T, int NS, bool kBackward>
void load_chunk(const Direction<T, NS>& dir, int64_t i0, Chunk<kBackward>& c) {
  const Block& blk = dir.blk;
  const int64_t R = dir.R, N = dir.N;
  const vf bias = load(blk.bias), D = load(blk.D);
  c.steps = static_cast<int>(dir.L - i0 < kChunkSteps ? dir.L - i0 : kChunkSteps);
  for (int t = 0; t < c.steps; ++t) {
    const int64_t pos = dir.position(i0 + t);
    const float* src = dir.x_dbl + pos * dir.stride;
    float* copy = blk.rows + t * row_floats(R);
    const float* row = src;
    if (!dir.in_place) {
      std::memcpy(copy, src, sizeof(float) * (R + N));
      std::memcpy(copy + R + NS, src + R + N, sizeof(float) * N);
      row = copy;
    }
    vf delta0 = bias, delta1 = vf{};
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) {
      delta0 += load(blk.weight + r * kLanes) * row[r];
      delta1 += load(blk.weight + (r + 1) * kLanes) * row[r + 1];
    }
    if (r < R) delta0 += load(blk.weight + r * kLanes) * row[r];
    const vf delta = delta0 + delta1;
    const vf dt = vsoftplus(delta);
    const vf uv = load_lanes(dir.u + pos * dir.Dm, dir.lanes);
    c.dt[t] = dt;
    c.dtu[t] = dt * uv;
    c.skip[t] = D * uv;
    c.rows[t] = row;
    c.positions[t] = pos;
    c.offsets[t] = pos * dir.Dm;
    if constexpr (kBackward) {
      c.u[t] = uv;
      c.slope[t] = vsigmoid(delta);
    }
  }
}

template <typename T, int NS>
void scan_direction(const CrossArgs& a, int k, int64_t c0, int lanes,
                    const Block& blk, bool accumulate) {
  const Direction<T, NS> dir(a, blk, k, c0, lanes);
  float* out = a.out + c0;
  vf A[NS], h[NS];
#pragma GCC unroll 16
  for (int n = 0; n < NS; ++n) {
    A[n] = load(blk.A_log2 + n * kLanes);
    h[n] = vf{};
  }
  Chunk<false> c;
  for (int64_t i0 = 0; i0 < dir.L; i0 += kChunkSteps) {
    load_chunk(dir, i0, c);
    for (int t = 0; t < c.steps; ++t) {
      const vf dt = c.dt[t], dtu = c.dtu[t];
      const float* B = c.rows[t] + dir.R;
      const float* C = B + NS;
      vf y0 = c.skip[t], y1 = vf{};
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
      if (accumulate) y += load_lanes(out + c.offsets[t], lanes);
      store_lanes(out + c.offsets[t], y, lanes);
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

// Sums of vectors over their lanes, kLanes vectors at a time: level S adds
// lanes S apart, pairing the vectors, so after log2(kLanes) levels lane i
// holds the sum of v[i].
constexpr int shuffle_lane(int j, int s, bool high) {
  const int block = j / (2 * s) * 2 * s, offset = j % (2 * s);
  return offset < s ? block + offset + (high ? s : 0)
                    : kLanes + block + offset - s + (high ? s : 0);
}

template <int S, bool kHigh, size_t... J>
MMV_INLINE vf pick(vf x, vf y, std::index_sequence<J...>) {
  return __builtin_shuffle(x, y, vi{shuffle_lane(J, S, kHigh)...});
}

template <int S>
MMV_INLINE void reduce_level(vf* v, int count) {
  const auto lanes = std::make_index_sequence<kLanes>{};
  for (int i = 0; i < count / 2; ++i) {
    v[i] = pick<S, false>(v[2 * i], v[2 * i + 1], lanes) +
           pick<S, true>(v[2 * i], v[2 * i + 1], lanes);
  }
}

// v: kLanes vectors (overwritten); returns the vector of their sums.
MMV_INLINE vf reduce_lanes(vf* v) {
  reduce_level<1>(v, kLanes);
  if constexpr (kLanes >= 4) reduce_level<2>(v, kLanes / 2);
  if constexpr (kLanes >= 8) reduce_level<4>(v, kLanes / 4);
  if constexpr (kLanes >= 16) reduce_level<8>(v, kLanes / 8);
  return v[0];
}

// Adds the lane sums of v[0, count) (count padded up to kLanes with zero
// vectors in v) to dst[0, count).
MMV_INLINE void add_lane_sums(vf* v, int64_t count, float* dst) {
  for (int64_t m = 0; m < count; m += kLanes) {
    const int take = static_cast<int>(count - m < kLanes ? count - m : kLanes);
    const vf sums = reduce_lanes(v + m);
    store_lanes(dst + m, load_lanes(dst + m, take) + sums, take);
  }
}

// The reverse scan of one direction of one block. A first pass keeps the
// state at the start of every chunk; then, from the last chunk to the first,
// the chunk's states and decays are recomputed from its start and the
// adjoint dh_i = dy_i C_i + exp(dt_{i+1} A) dh_{i+1} walks it backwards.
// du of this direction is written to g.du, the rest added to g.
template <typename T, int NS>
void backward_direction(const CrossArgs& a, const CrossGrads& g, int k,
                        int64_t c0, int lanes, const Block& blk) {
  const Direction<T, NS> dir(a, blk, k, c0, lanes);
  const int64_t R = dir.R, N = dir.N, width = R + 2 * N;
  const float* dout = g.dout + c0;
  float* du = g.du + c0;
  float* dx_dbl = g.dx_dbl + k * width;
  vf A_log2[NS], h[NS];
#pragma GCC unroll 16
  for (int n = 0; n < NS; ++n) {
    A_log2[n] = load(blk.A_log2 + n * kLanes);
    h[n] = vf{};
  }
  const int64_t chunks = chunks_of(dir.L);
  Chunk<true> c;
  for (int64_t ci = 0; ci < chunks; ++ci) {
    for (int n = 0; n < NS; ++n) store(blk.starts + (ci * NS + n) * kLanes, h[n]);
    load_chunk(dir, ci * kChunkSteps, c);
    for (int t = 0; t < c.steps; ++t) {
      const float* B = c.rows[t] + R;
#pragma GCC unroll 16
      for (int n = 0; n < NS; ++n) {
        h[n] = vexp2(A_log2[n] * c.dt[t]) * h[n] + c.dtu[t] * B[n];
      }
    }
  }
  const vf D = load(blk.D);
  vf dh[NS], decay_next[NS], dA[NS];
#pragma GCC unroll 16
  for (int n = 0; n < NS; ++n) dh[n] = decay_next[n] = dA[n] = vf{};
  vf dD = vf{}, dbias = vf{};
  std::memset(blk.dweight, 0, sizeof(float) * R * kLanes);
  vf hs[kChunkSteps][NS], decays[kChunkSteps][NS];
  // Lane sums of a step: d dt_low (R), dB (N), dC (N), padded to kLanes.
  const int64_t sums_padded = (width + kLanes - 1) / kLanes * kLanes;
  vf* sums = reinterpret_cast<vf*>(blk.sums);  // aligned: see carve
  for (int64_t ci = chunks - 1; ci >= 0; --ci) {
    load_chunk(dir, ci * kChunkSteps, c);
    const float* start = blk.starts + ci * NS * kLanes;
    for (int n = 0; n < NS; ++n) h[n] = load(start + n * kLanes);
    for (int t = 0; t < c.steps; ++t) {
      const float* B = c.rows[t] + R;
#pragma GCC unroll 16
      for (int n = 0; n < NS; ++n) {
        decays[t][n] = vexp2(A_log2[n] * c.dt[t]);
        h[n] = decays[t][n] * h[n] + c.dtu[t] * B[n];
        hs[t][n] = h[n];
      }
    }
    for (int t = c.steps - 1; t >= 0; --t) {
      const float* row = c.rows[t];
      const float* B = row + R;
      const float* C = B + NS;
      const vf dy = load_lanes(dout + c.offsets[t], lanes);
      vf sum_b = vf{}, sum_a = vf{};
      for (int64_t m = width; m < sums_padded; ++m) sums[m] = vf{};
#pragma GCC unroll 16
      for (int n = 0; n < NS; ++n) {
        dh[n] = dy * C[n] + decay_next[n] * dh[n];
        const vf h_prev = t > 0 ? hs[t - 1][n] : load(start + n * kLanes);
        const vf w = dh[n] * decays[t][n] * h_prev;
        dA[n] += c.dt[t] * w;
        sum_a += load(blk.A + n * kLanes) * w;
        sum_b += dh[n] * B[n];
        if (n < N) {
          sums[R + n] = c.dtu[t] * dh[n];
          sums[R + N + n] = dy * hs[t][n];
        }
        decay_next[n] = decays[t][n];
      }
      store_lanes(du + c.offsets[t], c.dt[t] * sum_b + D * dy, lanes);
      dD += dy * c.u[t];
      const vf ddelta = (c.u[t] * sum_b + sum_a) * c.slope[t];
      dbias += ddelta;
      for (int64_t r = 0; r < R; ++r) {
        float* dw = blk.dweight + r * kLanes;
        store(dw, load(dw) + ddelta * row[r]);
        sums[r] = ddelta * load(blk.weight + r * kLanes);
      }
      add_lane_sums(sums, width, dx_dbl + c.positions[t] * dir.stride);
    }
  }
  for (int i = 0; i < lanes; ++i) {
    const int64_t d = k * a.d_inner + c0 + i;
    for (int64_t n = 0; n < N; ++n) g.dA[d * N + n] += dA[n][i];
    for (int64_t r = 0; r < R; ++r) g.dt_weight[d * R + r] += blk.dweight[r * kLanes + i];
    g.dt_bias[d] += dbias[i];
    g.dD[d] += dD[i];
  }
}

template <typename T, int NS>
void backward_block(const CrossArgs& a, const CrossGrads& g, int k, int64_t c0,
                    const Block& blk) {
  const int lanes = static_cast<int>(
      a.d_inner - c0 < kLanes ? a.d_inner - c0 : kLanes);
  prepare_block(a, k, c0, lanes, blk);
  backward_direction<T, NS>(a, g, k, c0, lanes, blk);
}

// Calls F<T, NS>::run for the input type and N padded to a power of two.
template <template <typename, int> class F, typename... Args>
void dispatch(const CrossArgs& a, Args&&... args) {
  const auto with_states = [&](auto type) {
    using T = decltype(type);
    const int64_t N = a.d_state;
    if (N <= 1) return F<T, 1>::run(a, args...);
    if (N <= 2) return F<T, 2>::run(a, args...);
    if (N <= 4) return F<T, 4>::run(a, args...);
    if (N <= 8) return F<T, 8>::run(a, args...);
    return F<T, 16>::run(a, args...);
  };
  if (a.bf16) {
    with_states(uint16_t{});
  } else {
    with_states(float{});
  }
}

template <typename T, int NS>
struct Forward {
  static void run(const CrossArgs& a, int64_t c0, const Block& blk) {
    forward_block<T, NS>(a, c0, blk);
  }
};

template <typename T, int NS>
struct Backward {
  static void run(const CrossArgs& a, const CrossGrads& g, int k, int64_t c0,
                  const Block& blk) {
    backward_block<T, NS>(a, g, k, c0, blk);
  }
};

}  // namespace

int cross_lanes() { return kLanes; }

int64_t cross_scratch_floats(int64_t rank, int64_t length, bool backward) {
  return block_vectors(rank, length, backward) * kLanes +
         kChunkSteps * row_floats(rank);
}

void cross_forward_block(const CrossArgs& a, int64_t c0, float* scratch) {
  dispatch<Forward>(a, c0, carve(scratch, a.rank, a.length, false));
}

void cross_backward_block(const CrossArgs& a, const CrossGrads& g, int k,
                          int64_t c0, float* scratch) {
  dispatch<Backward>(a, g, k, c0, carve(scratch, a.rank, a.length, true));
}

}  // namespace mmvmamba::cpu::MMV_ISA
