// The plain op's layout (SeqIo): u / delta / y of shape (batch, channels, L)
// and B / C of shape (batch, groups, N, L), in T = float, half or bfloat16.
#pragma once

#include "scan_common.cuh"

namespace mmvmamba {
namespace scan_cuda {

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

  // The backward never keeps decays (see scan_bwd_kernel): its shared
  // memory allows the blocks its registers do.
  static constexpr bool kMayKeepDecays = false;
  // Its step sizes are the inputs' (no rank product).
  static constexpr bool kMayTensorStepSizes = false;
  // The forward's recurrence loads each step's inputs at the step
  // (scan_fwd_kernel).
  static constexpr int kFwdLoadsAhead = 0;
  // Rows are contiguous in L: no table of positions (see CrossIo).
  static constexpr bool kPositions = false;
  // The backward's softplus derivative stays -expm1f(-dt): the plain op is
  // the reference its A/B runs compare the fused one against.
  static constexpr bool kBranchFreeSigmoid = false;
  // The backward keeps Q lanes a channel (scan_bwd_lanes; see CrossIo).
  static constexpr bool kFragmentBackward = false;

  static int extra_floats(const ScanParams&) { return 0; }
  __device__ static void prepare(const ScanParams&, const BlockPos&, float*) {}

  // The tiles of Staged<kPass>.
  template <Pass kPass>
  struct Loads {
    using In = Staged<kPass>;
    T u[In::u ? kRowLoads : 1], delta[kRowLoads], dy[In::dy ? kRowLoads : 1];
    T B[In::B ? kStateLoads : 1], C[In::C ? kStateLoads : 1];

    __device__ void fetch(const ScanParams& p, const BlockPos& pos, int64_t l0,
                          const float*) {
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
          if constexpr (In::u) u[k] = ok ? u_row[k * kRowThreads] : zero;
          delta[k] = ok ? delta_row[k * kRowThreads] : zero;
          if constexpr (In::dy) dy[k] = ok ? dy_row[k * kRowThreads] : zero;
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
        if constexpr (In::B) B[k] = ok ? B_row[k * kStateThreads] : zero;
        if constexpr (In::C) C[k] = ok ? C_row[k * kStateThreads] : zero;
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
          if constexpr (In::u) s.u[c * kRow + t] = static_cast<float>(u[k]);
          s.dt[c * kRow + t] = row_ok && l0 + t < p.length ? dt : 0.0f;
          if constexpr (In::dy) s.dy[c * kRow + t] = static_cast<float>(dy[k]);
        }
      }
      const int n = threadIdx.x / kStateThreads;
      const int j = threadIdx.x % kStateThreads;
#pragma unroll
      for (int k = 0; k < kStateLoads; ++k) {
        const int t = j + k * kStateThreads;
        if constexpr (In::B) s.B[t * Tl::state_row + n] = static_cast<float>(B[k]);
        if constexpr (In::C) s.C[t * Tl::state_row + n] = static_cast<float>(C[k]);
      }
    }
  };

  // y of the tile's steps (in s.dt, rows of kRow per channel).
  __device__ static void store_y(const ScanParams& p, const BlockPos& pos,
                                 int64_t l0, const TileSmem& s) {
    const float* y_s = s.dt;
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

  // du and d(delta) of the tile (in s.u and s.dt, rows of kRow).
  __device__ static void store_grads(const ScanParams& p, const BlockPos& pos,
                                     int64_t l0, const TileSmem& s, float*) {
    const float* du_s = s.u;
    const float* dd_s = s.dt;
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
  }

  // Adds the block's dB / dC of the kPiece steps from step t0 of the tile
  // from l0 (the warps' terms in `grads`, see sum_state_grad). Threads take
  // consecutive steps of a state.
  __device__ static void store_state_grads(const ScanParams& p,
                                           const BlockPos& pos, int64_t l0, int t0,
                                           const float* grads, const TileSmem&,
                                           const float*) {
    const int64_t l = l0 + t0;
    const int64_t bc = (pos.b * p.groups + pos.g) * p.d_state;
#pragma unroll
    for (int i = threadIdx.x; i < 2 * Tl::states * kPiece; i += kThreads) {
      const int t = i % kPiece, j = i / kPiece;
      const int n = j % Tl::states;
      if (n < p.d_state && l + t < p.length) {
        float* grad = j < Tl::states ? p.dB : p.dC;
        atomicAdd(grad + (bc + n) * p.length + l + t, sum_state_grad<Q>(grads, t, j));
      }
    }
  }
};

}  // namespace scan_cuda
}  // namespace mmvmamba
