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

// The rank products run on the tensor cores (mma.sync m16n8k8, tf32 in,
// float32 accumulators) with the 3xTF32 split: a = hi + lo, hi = a rounded
// to tf32 (nearest, ties away: 10 fraction bits), lo = a - hi (exact in
// float32), and a b ~ lo_a hi_b + hi_a lo_b + hi_a hi_b (lo lo dropped).
// The tensor core reads the upper 19 bits of an operand word (ptxas's own
// cvt.rna.tf32.f32 hands it the rounded word unmasked), so lo enters
// truncated toward zero: |a - hi| <= 2^-11 |a|, and lo's truncation and the
// dropped lo lo term leave each product within about 2.5 x 2^-21 |a b| (see
// docs/scan_kernel_notes.md, "Rank products on tensor cores (3xTF32)").
struct Tf32Split {
  uint32_t hi, lo;
};
__device__ __forceinline__ Tf32Split split_tf32(float a) {
  const uint32_t hi = (__float_as_uint(a) + 0x1000u) & 0xffffe000u;
  return {hi, __float_as_uint(a - __uint_as_float(hi))};
}

// d += a b for one m16n8k8 tile (a: rows g, g + 8 x columns q, q + 4 of
// lane 4 g + q; b: rows q, q + 4 x column g; d: rows g, g + 8 x columns
// 2 q, 2 q + 1).
__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1,
                                         uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// An A fragment (4 values) and a B fragment (2 values), split.
struct FragA {
  Tf32Split v[4];
  __device__ void set(float a0, float a1, float a2, float a3) {
    v[0] = split_tf32(a0);
    v[1] = split_tf32(a1);
    v[2] = split_tf32(a2);
    v[3] = split_tf32(a3);
  }
};
struct FragB {
  Tf32Split v[2];
  __device__ void set(float b0, float b1) {
    v[0] = split_tf32(b0);
    v[1] = split_tf32(b1);
  }
};

// The two small terms of d += a b (issue them for every tile of a k-step
// first, then the large ones: the three products of a tile are dependent).
__device__ __forceinline__ void mma_small_terms(float (&d)[4], const FragA& a,
                                                const FragB& b) {
  mma_tf32(d, a.v[0].lo, a.v[1].lo, a.v[2].lo, a.v[3].lo, b.v[0].hi, b.v[1].hi);
  mma_tf32(d, a.v[0].hi, a.v[1].hi, a.v[2].hi, a.v[3].hi, b.v[0].lo, b.v[1].lo);
}
__device__ __forceinline__ void mma_large_term(float (&d)[4], const FragA& a,
                                               const FragB& b) {
  mma_tf32(d, a.v[0].hi, a.v[1].hi, a.v[2].hi, a.v[3].hi, b.v[0].hi, b.v[1].hi);
}

// SS2D's fused layout (see the top of the file); N <= 16, so Q = 4. A warp
// reads 32 channels of one position (coalesced in every scan order); the
// extra shared memory holds the positions of the next chunk's steps
// (below), dt_weight of the block's channels, dt_pitch ranks (R rounded up
// to a multiple of 4, zero-padded) of 32 channels; and the tile's dt_low
// transposed, dt_pitch ranks (the padding ones zero) of kSteps steps. The
// rank products run on the tensor cores (3xTF32, see split_tf32); the two
// tiles are stored permuted (weight_index, low_index) so that their
// fragment reads are free of bank conflicts. The backward adds each chunk's
// d dt_weight to the gradient (atomics): rows of it in shared memory would
// cost the 4th block per SM at R = 24.
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
// steps < kSteps); that copy holds -1 past L, which the dB / dC stores
// test instead of the step. So the kernels call index_chunk for the next chunk after
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
  // The forward computes its step sizes on the tensor cores from rank
  // kTensorStepRank on, and wherever shared memory limits its blocks as
  // much as that kernel's registers do (see tensor_step_sizes in
  // scan_launch.cuh); on the FMA pipes elsewhere. The threshold is where
  // they crossed on an H200 (docs/scan_kernel_notes.md, "Tails past L, and
  // the forward's step sizes on the tensor cores").
  static constexpr bool kMayTensorStepSizes = true;
  static constexpr int kTensorStepRank = 24;
  // The forward's recurrence loads each step's inputs 2 steps ahead and
  // computes its decays 1 step ahead (scan_fwd_kernel).
  static constexpr int kFwdLoadsAhead = 2;
  // The backward's reverse scan (scan_bwd_fragment) loads each step's
  // inputs kBwdLoadsAhead steps ahead; without kept decays, 1 ahead in the
  // first kBwdShortPieces pieces it scans, where 2 ahead would spill the
  // later pieces' starts (docs/scan_kernel_notes.md, "Backward schedule
  // against latency": the fastest of the schedules timed).
  static constexpr int kBwdLoadsAhead = 2;
  static constexpr int kBwdShortPieces = 3;

  // Every load and store of a chunk reads its steps' positions in shared
  // memory (index_chunk); the kernels call it.
  static constexpr bool kPositions = true;
  // The backward's softplus derivative by sigmoid_from_softplus (1-2 ulp
  // from -expm1f(-dt), half the instructions).
  static constexpr bool kBranchFreeSigmoid = true;
  // The table of the next chunk's kSteps int32 positions, in floats.
  static constexpr int kPositionFloats = kSteps;
  // The scanned chunk's positions lie in the padding column of the u and dt
  // tiles, which are contiguous: rows 0 .. kSteps - 1 of the two (the full
  // passes; the summaries store nothing).
  template <Pass kPass>
  static constexpr bool kPaddingColumn = SmemLayout<Q, kPass>::u == 0 &&
                                         SmemLayout<Q, kPass>::dt == Tl::channels * kRow;
  static_assert(kPaddingColumn<Pass::kForward> && kPaddingColumn<Pass::kBackward> &&
                    2 * Tl::channels >= kSteps && kRow > kSteps,
                "a padding column of kSteps rows in the u and dt tiles");

  // The backward runs in the fragment layout (FragmentLane, scan_bwd.cuh):
  // its tiles are staged by Loads<Pass::kBackward, true> (pair_dy_index,
  // pair_state_index), its dB / dC terms stored in rows of kStateGradRow.
  static constexpr bool kFragmentBackward = true;
  // A warp's dB / dC of one step in the fragment layout: value 16 k + n is
  // the dB (k = 0) or dC (k = 1) of state n, summed over the warp's 8
  // channels (rows of the backward's grad_row floats hold them).
  static constexpr int kStateGradRow = 2 * Tl::states;
  static_assert(kStateGradRow <= Tl::grad_row, "a step's values in a grad_row");

  // The fragment layout's dy tile, [step][channel]: channels c and c + 4 of
  // a group of 8 adjacent (one 8-byte load for a lane's two channels), in
  // the region of the [channel][kRow] tile.
  __device__ static int pair_dy_index(int c, int t) {
    return t * Tl::channels + (c & ~7) + 2 * (c & 3) + ((c >> 2) & 1);
  }
  // The fragment layout's B and C, one tile [step][state g < 8] of float4s
  // over the B and C regions: B of states g, g + 8, C of states g, g + 8
  // (one 16-byte load a lane and step), the two halves swapped at odd steps
  // (the staging's stores, two steps a warp, fall in distinct banks).
  __device__ static int pair_state_index(int t, int n, int kind) {
    return t * 2 * Tl::states + 4 * (n & 7) + (((n >> 3) + 2 * kind) ^ (2 * (t & 1)));
  }
  static_assert(SmemLayout<Q, Pass::kBackward>::C ==
                        SmemLayout<Q, Pass::kBackward>::B + kSteps * Tl::state_row &&
                    kSteps * Tl::channels <= Tl::channels * kRow,
                "the fragment layout's tiles fit the B, C and dy regions");

  // The backward's offset of the block's first dB column in dx_dbl (int64,
  // in floats from p.dx_dbl: two float words of a float4 slot, after the
  // position table), written by prepare, read by store_state_grads.
  static constexpr int kOffsetFloats = 4;

  // The tile's dt_low, [rank][step]: rows of kLowPitch floats (a multiple
  // of 4, so every row is as 16-byte aligned as the region).
  static constexpr int kLowPitch = kSteps;
  // The rank products' fragment maps (store_grads, Loads::stage) are written
  // for this block shape.
  static_assert(Tl::channels == 32 && kSteps == 64 && kThreads == 128 &&
                    kLowPitch == 64,
                "the rank products' tiles: 32 channels, 64 steps, 4 warps");

  // Where the rank products' operands lie in shared memory (each region the
  // same size as before; see the notes for the bank maps). dt_weight of the
  // block, [rank][channel]: the 8 groups of 4 channels of rank r permuted by
  // r (a float4 keeps its channels in order). dt_low, [rank][step]: steps
  // permuted by bits 0 and 1 of the rank (bits 3 and 4 of the step flipped).
  // The tiles are conflict-free to read as fragments that way.
  __device__ static int weight_index(int c, int r) {
    return r * Tl::channels + (((c >> 2) ^ (2 * (r & 3) + ((r >> 2) & 1))) << 2) + (c & 3);
  }
  __device__ static int low_index(int r, int t) {
    return r * kLowPitch + (t ^ (16 * (r & 1) + 8 * ((r >> 1) & 1)));
  }

  // The position table, the dB column's offset, dt_weight rows and the
  // tile's dt_low (every pass).
  static int extra_floats(const ScanParams& p) {
    return kPositionFloats + kOffsetFloats + (Tl::channels + kSteps) * p.dt_pitch;
  }

  // The regions of the extra shared memory (16-byte aligned: kPositionFloats,
  // kOffsetFloats and dt_pitch are multiples of 4).
  __device__ static float* column_offset(float* extra) { return extra + kPositionFloats; }
  __device__ static float* weights(float* extra) { return column_offset(extra) + kOffsetFloats; }
  __device__ static float* dt_low(float* extra, const ScanParams& p) {
    return weights(extra) + Tl::channels * p.dt_pitch;
  }

  // Positions are kept in float words, bit for bit (no type punning).
  // The position of step t of the chunk to be fetched (0 past L).
  __device__ static int next_position(const float* extra, int t) {
    return __float_as_int(extra[t]);
  }

  // The position of step t of the chunk being scanned (stage() copied it;
  // -1 past L).
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

  // The block's rows of dt_weight, kept for the whole kernel.
  __device__ static void prepare(const ScanParams& p, const BlockPos& pos,
                                 float* extra) {
    float* w_s = weights(extra);
    for (int i = threadIdx.x; i < Tl::channels * p.dt_pitch; i += kThreads) {
      const int c = i / p.dt_pitch, r = i % p.dt_pitch;
      const int64_t d_in_group = pos.cblock * Tl::channels + c;
      w_s[weight_index(c, r)] =
          d_in_group < p.per_group && r < p.rank
              ? p.dt_weight[(pos.g * p.per_group + d_in_group) * p.rank + r]
              : 0.0f;
    }
    if (threadIdx.x == 0) {
      // Row (b, 0) of dx_dbl, direction g, its first dB column (R); the
      // backward's stores add state and position offsets to it (written in
      // every pass: store_state_grads reads it unconditionally).
      const uint64_t offset = static_cast<uint64_t>(
          x_image_start(p, pos) + static_cast<int>(pos.g) * (p.rank + 2 * p.d_state) + p.rank);
      float* words = column_offset(extra);
      words[0] = __uint_as_float(static_cast<uint32_t>(offset));
      words[1] = __uint_as_float(static_cast<uint32_t>(offset >> 32));
    }
  }

  // The tiles of Staged<kPass>. kFragment (the full backward): staged for
  // its fragment layout (pair_dy_index, pair_state_index).
  template <Pass kPass, bool kFragment = false>
  struct Loads {
    using In = Staged<kPass>;
    static_assert(kPass == Pass::kBackward || !kFragment,
                  "the fragment layout is the full backward's");
    T u[In::u ? kRowLoads : 1], B[In::B ? kStateLoads : 1], C[In::C ? kStateLoads : 1];
    float dy[In::dy ? kRowLoads : 1];

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
            In::dy ? static_cast<const float*>(p.dy) + start : nullptr;
#pragma unroll
        for (int k = 0; k < kRowLoads; ++k) {
          const int at = next_position(extra, j + k * kStepThreads);
          const bool ok = row_ok && j + k * kStepThreads < steps;
          if constexpr (In::u) {
            const T* u_at = row_at(u_map, at, map_pitch<T>(p));
            u[k] = ok ? *u_at : zero;
          }
          if constexpr (In::dy) {
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
        if constexpr (In::B) {
          const T* B_at = row_at(B_rows, at, row_pitch<T>(p));
          B[k] = ok ? *B_at : zero;
        }
        if constexpr (In::C) {
          const T* C_at = row_at(C_rows, at, row_pitch<T>(p));
          C[k] = ok ? *C_at : zero;
        }
      }
    }

    // Stores the loads, then the tile's dt_low (and, the full passes, copies
    // the tile's positions for their stores), then computes the step sizes
    // softplus(bias + dt_weight @ dt_low) of the block's channels: on the
    // tensor cores with kTensorSteps (the backward's always, the forward's
    // where its launch chooses), else on the FMA pipes.
    template <bool kTensorSteps = kPass == Pass::kBackward>
    __device__ void stage(const ScanParams& p, const BlockPos& pos, int64_t l0,
                          const TileSmem& s, float* extra) const {
      const int c = threadIdx.x % Tl::channels;
      const int j = threadIdx.x / Tl::channels;
#pragma unroll
      for (int k = 0; k < kRowLoads; ++k) {
        const int t = j + k * kStepThreads;
        if constexpr (In::u) s.u[c * kRow + t] = static_cast<float>(u[k]);
        if constexpr (kFragment) {
          s.dy[pair_dy_index(c, t)] = dy[k];
        } else if constexpr (In::dy) {
          s.dy[c * kRow + t] = dy[k];
        }
      }
      {
        const int n = threadIdx.x % Tl::states;
        const int js = threadIdx.x / Tl::states;
#pragma unroll
        for (int k = 0; k < kStateLoads; ++k) {
          const int t = js + k * kStateThreads;
          if constexpr (kFragment) {
            s.B[pair_state_index(t, n, 0)] = static_cast<float>(B[k]);
            s.B[pair_state_index(t, n, 1)] = static_cast<float>(C[k]);
          } else {
            if constexpr (In::B) s.B[t * Tl::state_row + n] = static_cast<float>(B[k]);
            if constexpr (In::C) s.C[t * Tl::state_row + n] = static_cast<float>(C[k]);
          }
        }
      }
      float* dtl_s = dt_low(extra, p);
      {
        // Thread: step t, ranks r0, r0 + 2, ...
        const int t = threadIdx.x % kSteps;
        const int r0 = threadIdx.x / kSteps;
        const bool ok = t < chunk_steps(p, l0);
        const int at = next_position(extra, t);
        if constexpr (In::kFull) {
          if (r0 == 0) s.u[t * kRow + kSteps] = __int_as_float(ok ? at : -1);
        }
        const T* row = row_at(static_cast<const T*>(p.delta) + x_image_start(p, pos) +
                                  pos.g * (p.rank + 2 * p.d_state),
                              at, row_pitch<T>(p));
        // low_index permutes the steps by r % 4 only: ranks r0 + 4 i and r0
        // + 4 i + 2 (dt_pitch is a multiple of 4).
        static_assert(kThreads / kSteps == 2, "two ranks a pass of the staging");
        float* dtl_a = dtl_s + low_index(r0, t);
        float* dtl_b = dtl_s + low_index(r0 + 2, t);
        for (int r = r0; r < p.dt_pitch; r += 4) {
          dtl_a[(r - r0) * kLowPitch] = ok && r < p.rank ? static_cast<float>(row[r]) : 0.0f;
          dtl_b[(r - r0) * kLowPitch] =
              ok && r + 2 < p.rank ? static_cast<float>(row[r + 2]) : 0.0f;
        }
      }
      __syncthreads();
      // The full backward's recomputation on the tensor cores; the summaries,
      // and the forward where its launch does not choose them, on the FMA
      // pipes, where the products' fragments and accumulators would spill
      // under their register bounds (see docs/scan_kernel_notes.md).
      static_assert(!kTensorSteps || In::kFull, "the full passes' tiles");
      if constexpr (kTensorSteps) {
        step_sizes(p, pos, l0, s, extra);
      } else {
        step_sizes_fma<kPass == Pass::kForward>(p, pos, l0, s, extra);
      }
    }
  };

  // One k-step (ranks k0 .. k0 + 7; !kFull: k0 .. k0 + 3, the ranks from k0
  // + 4 on zero) of step_sizes' product.
  template <bool kFull>
  __device__ static void step_size_kstep(float (&acc)[2][2][4], const float* w_a,
                                         const float* w_b, const float* const (&l_a)[2],
                                         int k0) {
    const float4 w0 = *reinterpret_cast<const float4*>(w_a + k0 * Tl::channels);
    const float4 w1 = kFull ? *reinterpret_cast<const float4*>(w_b + k0 * Tl::channels)
                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    FragA a[2];
    a[0].set(w0.x, w0.y, w1.x, w1.y);
    a[1].set(w0.z, w0.w, w1.z, w1.w);
    FragB b[2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      b[nt].set(l_a[nt][k0 * kLowPitch], kFull ? l_a[nt][(k0 + 4) * kLowPitch] : 0.0f);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mma_small_terms(acc[mt][nt], a[mt], b[nt]);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mma_large_term(acc[mt][nt], a[mt], b[nt]);
    }
  }

  // The step sizes softplus(bias + dt_weight @ dt_low) of the tile (the
  // padding channels and steps past L zero) into s.dt, on the tensor cores:
  // [32 channels x 64 steps] = W [32 x R] L [R x 64] in 3xTF32, K = 8 ranks
  // a k-step (the last one half when dt_pitch % 8 = 4: zero fragments, no
  // loads past dt_pitch). Warp w: steps 16 w .. 16 w + 15 (2 n-tiles), all
  // channels (2 m-tiles); lane 4 g + q. Tile rows: channel 4 g + 2 mt (rows
  // g) and 4 g + 2 mt + 1 (rows g + 8), so a lane's A values of a rank are
  // one float4 of weight_index; columns n of n-tile nt: step 16 w + 8 nt +
  // n / 2 + 4 (n % 2), so that the lane's outputs (steps q, q + 4) are
  // stored without bank conflicts (s.dt's rows of kRow = 65).
  __device__ static void step_sizes(const ScanParams& p, const BlockPos& pos, int64_t l0,
                                    const TileSmem& s, float* extra) {
    const float* w_s = weights(extra);
    const float* dtl_s = dt_low(extra, p);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, q = lane % 4;
    const int steps = chunk_steps(p, l0);
    float acc[2][2][4];
    int live[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t d_in_group = pos.cblock * Tl::channels + 4 * g + 2 * mt + h;
        const bool row_ok = d_in_group < p.per_group;
        const float bias = row_ok ? p.delta_bias[pos.g * p.per_group + d_in_group] : 0.0f;
        // The steps before L, none for a padding channel.
        live[mt][h] = row_ok ? steps : 0;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          acc[mt][nt][2 * h] = bias;
          acc[mt][nt][2 * h + 1] = bias;
        }
      }
    }
    // Ranks k0 + q (a0, a1, b0) and k0 + q + 4 (a2, a3, b1).
    const float* w_a = w_s + weight_index(4 * g, q);
    const float* w_b = w_s + weight_index(4 * g, q + 4);
    const float* l_a[2] = {};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      l_a[nt] = dtl_s + low_index(q, 16 * warp + 8 * nt + (g >> 1) + 4 * (g & 1));
    }
    // A warp whose 16 steps are all past L (stage 2's last chunk: 4 steps)
    // skips the product: its outputs are zeros (a warp-uniform test, through
    // the shuffle as in store_grads).
    if (__shfl_sync(0xffffffffu, 16 * warp < steps, 0)) {
      int k0 = 0;
      for (; k0 + 8 <= p.dt_pitch; k0 += 8) step_size_kstep<true>(acc, w_a, w_b, l_a, k0);
      if (k0 < p.dt_pitch) step_size_kstep<false>(acc, w_a, w_b, l_a, k0);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = 4 * g + 2 * mt + i / 2;
          const int t = 16 * warp + 8 * nt + q + 4 * (i % 2);
          s.dt[c * kRow + t] = t < live[mt][i / 2] ? softplus(acc[mt][nt][i]) : 0.0f;
        }
      }
    }
  }

  // step_sizes on the FMA pipes, reading the same permuted tiles: thread
  // channel c, steps j kRowLoads .. j kRowLoads + kRowLoads - 1 (j the
  // warp: the dt_low loads are broadcasts), each step's sum in rank order,
  // four ranks a pass (the padding adds zeros).
  template <bool kSkipPastL>
  __device__ static void step_sizes_fma(const ScanParams& p, const BlockPos& pos, int64_t l0,
                                        const TileSmem& s, float* extra) {
    static_assert(kRowLoads == 16, "a thread's steps: one 16-step group of low_index");
    const float* w_s = weights(extra);
    const float* dtl_s = dt_low(extra, p);
    const int c = threadIdx.x % Tl::channels;
    const int j = threadIdx.x / Tl::channels;
    const int64_t d_in_group = pos.cblock * Tl::channels + c;
    const bool row_ok = d_in_group < p.per_group;
    const float bias = row_ok ? p.delta_bias[pos.g * p.per_group + d_in_group] : 0.0f;
    // The steps before L, none for a padding channel.
    const int steps = chunk_steps(p, l0);
    const int live = row_ok ? steps : 0;
    float x[kRowLoads];
#pragma unroll
    for (int k = 0; k < kRowLoads; ++k) x[k] = bias;
    // kSkipPastL (the forward; the summaries' registers spill more with
    // it): threads whose steps are all past L (a warp's: stage 2's last
    // chunk) skip the product, their outputs are zeros.
    const int rank = !kSkipPastL || kRowLoads * j < steps ? p.rank : 0;
    // Rank r + i (r a multiple of 4) permutes by i alone: low_index flips
    // bit 4 of the step (the 16-step group) for odd i and bit 3 for i >= 2.
    const float* group[2] = {dtl_s + kRowLoads * j, dtl_s + kRowLoads * (j ^ 1)};
    for (int r = 0; r < rank; r += 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float w = w_s[weight_index(c, r + i)];
        const float* steps = group[i & 1] + (r + i) * kLowPitch;
#pragma unroll
        for (int k = 0; k < kRowLoads; k += 4) {
          const float4 v = *reinterpret_cast<const float4*>(steps + (k ^ (8 * (i >> 1))));
          x[k] = fmaf(w, v.x, x[k]);
          x[k + 1] = fmaf(w, v.y, x[k + 1]);
          x[k + 2] = fmaf(w, v.z, x[k + 2]);
          x[k + 3] = fmaf(w, v.w, x[k + 3]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRowLoads; ++k) {
      const int t = j * kRowLoads + k;
      s.dt[c * kRow + t] = t < live ? softplus(x[k]) : 0.0f;
    }
  }

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
  // dx_dbl; adds the chunk's d dt_weight (sum_t dd[c][t] dt_low[t]) to the
  // gradient. dd (in s.dt) holds d(step size) before the softplus, zero past
  // L and for padding channels. Both products run on the tensor cores in 3xTF32 (see
  // split_tf32), in n-tiles of 8 ranks: those past dt_pitch get zero
  // fragments (no loads), their outputs are not kept.
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const TileSmem& s, float* extra) {
    const float* dd_s = s.dt;
    add_to_map(p, pos, l0, static_cast<float*>(p.du), s.u, s);
    // The padding channels' lanes left add_to_map early: the warp is whole
    // again before mma.sync.aligned.
    __syncwarp();
    const float* w_s = weights(extra);
    const float* dtl_s = dt_low(extra, p);
    const int steps = chunk_steps(p, l0);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, q = lane % 4;
    {
      // d dt_low [64 steps x R] = dd^T [64 x 32] W [32 x R]; K = the
      // channels, k-step ks: channels 8 ks + column (so a lane's B values of
      // a rank are in weight_index's group 2 ks, 2 ks + 1). Warp w's m-tile:
      // step m0 + 4 g (rows g) and m0 + 4 g + 1 (rows g + 8), m0 = 32 (w / 2)
      // + 2 (w % 2), so that the A values (dd at channel + step) fall in
      // distinct banks. Four n-tiles a pass.
      const int t_row = 32 * (warp >> 1) + 2 * (warp & 1) + 4 * g;
      float* x_rows = p.dx_dbl + x_image_start(p, pos) +
                      static_cast<int>(pos.g) * (p.rank + 2 * p.d_state);
      float* rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int at = scanned_position(s, t_row + h);
        rows[h] = t_row + h < steps ? row_at(x_rows, at, row_pitch<float>(p)) : nullptr;
      }
      const float* dd_a = dd_s + q * kRow + t_row;
      // Passes of 4 n-tiles, the last one of those below dt_pitch only (a
      // warp-uniform count); none where the warp's first step (lane 0's) is
      // past L: its rows are not added.
      const int n_end = __shfl_sync(0xffffffffu, t_row < steps ? p.dt_pitch : 0, 0);
      for (int n0 = 0; n0 < n_end; n0 += 32) {
        switch (min(4, (p.dt_pitch - n0 + 7) / 8)) {
          case 4: low_grad_pass<4>(p, w_s, dd_a, rows, n0); break;
          case 3: low_grad_pass<3>(p, w_s, dd_a, rows, n0); break;
          case 2: low_grad_pass<2>(p, w_s, dd_a, rows, n0); break;
          default: low_grad_pass<1>(p, w_s, dd_a, rows, n0); break;
        }
      }
    }
    {
      // d dt_weight [32 x R] += dd [32 x 64] L^T [64 x R]. K = the steps in
      // k-step pairs of 16: k-step 2 P + s, column q: step 16 P + 4 q + 2 s,
      // column q + 4: the step after (a lane's B values of two k-steps are one
      // float4). Warp w: m-tile w % 2, rows g: channel (g % 4) + 16 (g / 4) +
      // 8 (w % 2), rows g + 8: 4 channels on (distinct banks for dd's
      // reads); n-tiles 8 (w / 2) + 16 j, two a pass.
      // The warp's n-tiles: a warp-uniform loop (the shuffle tells the
      // compiler so; a trip count it thinks divergent around mma.sync makes
      // it guard the whole kernel's warp-synchronous code).
      const int n_first = __shfl_sync(0xffffffffu, 8 * (warp >> 1), 0);
      const int c = (g & 3) + 16 * (g >> 2) + 8 * (warp & 1);
      const float* dd_a = dd_s + c * kRow + 4 * q;
      const float* l_even = dtl_s + low_index(g, 4 * q);
      const float* l_odd = dtl_s + low_index(g, 16 + 4 * q);
      // The gradient's rows of channels c and c + 4 (null for padding).
      float* dw_rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t d_in_group = pos.cblock * Tl::channels + c + 4 * h;
        dw_rows[h] = d_in_group < p.per_group
                         ? p.ddt_weight + (pos.g * p.per_group + d_in_group) * p.rank
                         : nullptr;
      }
      // The k-step pairs (16 steps each) that hold a step before L: dd is
      // zero past it (block-uniform; through the shuffle for the compiler).
      const int pairs = __shfl_sync(0xffffffffu, (steps + 15) / 16, 0);
      for (int n0 = n_first; n0 < p.dt_pitch; n0 += 32) {
        // The second n-tile only below dt_pitch (a warp-uniform test; the
        // first always is).
        if (n0 + 16 < p.dt_pitch) {
          weight_grad_pass<2>(p, dw_rows, dd_a, l_even, l_odd, n0, pairs);
        } else {
          weight_grad_pass<1>(p, dw_rows, dd_a, l_even, l_odd, n0, pairs);
        }
      }
    }
  }

  // kTiles n-tiles (n0 + 8 j) of store_grads' d dt_low product, added into
  // the rows of dx_dbl (rows[h]: step t_row + h, null past L).
  template <int kTiles>
  __device__ static void low_grad_pass(const ScanParams& p, const float* w_s,
                                       const float* dd_a, float* const (&rows)[2], int n0) {
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, q = lane % 4;
    const int group = 2 * (g & 3) + (g >> 2);  // weight_index's permutation at rank g
    float acc[kTiles][4] = {};
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      FragA a;
      a.set(dd_a[8 * ks * kRow], dd_a[8 * ks * kRow + 1], dd_a[(8 * ks + 4) * kRow],
            dd_a[(8 * ks + 4) * kRow + 1]);
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        // (the last n-tile may end at dt_pitch after 4 ranks: zeros past it)
        const int r = n0 + 8 * j + g;
        const bool ok = j + 1 < kTiles || r < p.dt_pitch;
        const float* w_r = w_s + r * Tl::channels + q;
        FragB b;
        b.set(ok ? w_r[4 * ((2 * ks) ^ group)] : 0.0f, ok ? w_r[4 * ((2 * ks + 1) ^ group)] : 0.0f);
        mma_small_terms(acc[j], a, b);
        mma_large_term(acc[j], a, b);
      }
    }
    add_tiles<kTiles, 8>(p, rows, acc, n0);
  }

  // kTiles n-tiles (n0, n0 + 16) of store_grads' d dt_weight product over
  // the first `pairs` k-step pairs (16 steps each), added into the
  // gradient's rows of channels c, c + 4 (rows[h], null for a padding
  // channel). The last n-tile may end at dt_pitch after 4 ranks: zero B
  // values past it, and its outputs there are not added.
  template <int kTiles>
  __device__ static void weight_grad_pass(const ScanParams& p, float* const (&rows)[2],
                                          const float* dd_a, const float* l_even,
                                          const float* l_odd, int n0, int pairs) {
    const int g = threadIdx.x % 32 / 4;
    // Output (h, e) of n-tile j (accumulator 2 h + e): channel c + 4 h, rank
    // n0 + 16 j + 2 q + e.
    float acc[kTiles][4] = {};
#pragma unroll
    for (int P = 0; P < 4; ++P) {
      if (P >= pairs) break;
      FragB b[kTiles][2];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        const float* l = (P & 1 ? l_odd : l_even) + (n0 + 16 * j) * kLowPitch + 32 * (P >> 1);
        const float4 v = j + 1 < kTiles || n0 + 16 * j + g < p.dt_pitch
                             ? *reinterpret_cast<const float4*>(l)
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        b[j][0].set(v.x, v.y);
        b[j][1].set(v.z, v.w);
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int t = 16 * P + 2 * k;
        FragA a;
        a.set(dd_a[t], dd_a[4 * kRow + t], dd_a[t + 1], dd_a[4 * kRow + t + 1]);
#pragma unroll
        for (int j = 0; j < kTiles; ++j) mma_small_terms(acc[j], a, b[j][k]);
#pragma unroll
        for (int j = 0; j < kTiles; ++j) mma_large_term(acc[j], a, b[j][k]);
      }
    }
    add_tiles<kTiles, 16>(p, rows, acc, n0);
  }

  // Adds the accumulators of kTiles n-tiles of a rank product to two rows
  // of a gradient: accumulator 2 h + e of n-tile j goes to rows[h] (null:
  // not added) at rank n0 + kTileStep j + 2 q + e, ranks below p.rank only.
  template <int kTiles, int kTileStep>
  __device__ static void add_tiles(const ScanParams& p, float* const (&rows)[2],
                                   const float (&acc)[kTiles][4], int n0) {
    const int q = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = n0 + kTileStep * j + 2 * q + i % 2;
        if (rows[i / 2] != nullptr && r < p.rank) atomicAdd(rows[i / 2] + r, acc[j][i]);
      }
    }
  }

  // Adds the block's dB / dC of the kPiece steps from step t0 of the tile
  // (the warps' values in `grads`: [warp][kPiece] rows of grad_row floats,
  // kStateGradRow of them used, see reduce_state_grads_fragment) into dx_dbl.
  // Thread value j = threadIdx % 32 (the dB of state j or the dC of state j -
  // 16), steps threadIdx / 32 and + 4: the two positions first, then 4
  // loads, 3 FADD (the warps in order, from the first one's value) and 1 RED
  // each. The column's offset comes from prepare.
  __device__ static void store_state_grads(const ScanParams& p,
                                           const BlockPos& pos, int64_t l0, int t0,
                                           const float* grads, const TileSmem& s,
                                           float* extra) {
    static_assert(kThreads / kStateGradRow == kPiece / 2, "two steps a thread");
    const int j = threadIdx.x % kStateGradRow;
    const int n = j % Tl::states;
    if (n >= p.d_state) return;
    const float2 words = *reinterpret_cast<const float2*>(column_offset(extra));
    const uint64_t offset = static_cast<uint64_t>(__float_as_uint(words.y)) << 32 |
                            __float_as_uint(words.x);
    float* column = p.dx_dbl + (offset + (j < Tl::states ? n : p.d_state + n));
    const int t = threadIdx.x / kStateGradRow;
    const int at[2] = {scanned_position(s, t0 + t),  // -1 past L
                       scanned_position(s, t0 + t + kPiece / 2)};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (at[i] >= 0) {
        const float* v = grads + (t + i * kPiece / 2) * Tl::grad_row + j;
        float sum = v[0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) sum += v[w * kPiece * Tl::grad_row];
        atomicAdd(row_at(column, at[i], row_pitch<float>(p)), sum);
      }
    }
  }
};

}  // namespace scan_cuda
}  // namespace mmvmamba
