// Host code shared by the CUDA scans: the segment choice and the kernel
// chaining the segments' summaries (scan_launch.cuh says how they work).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "scan_launch.cuh"

namespace mmvmamba {
namespace scan_cuda {
namespace {

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

// Segments are at least this many chunks long (unless forced).
constexpr int64_t kMinSegChunks = 4;
// Waves of blocks a split sequence is cut for, by pass (choose_segments).
constexpr int64_t kForwardWaves = 2;
constexpr int64_t kBackwardWaves = 4;
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

}  // namespace

// Sets p.seg_chunks / p.segments for a launch of `blocks` blocks per
// segment of the forward or backward pass. Every segment but one costs a
// summary pass over its chunks: about two thirds of a full pass forward (the
// whole recurrence, without C and y), about a sixth backward (the carry of
// dh alone). So the forward splits the sequence only when its blocks fill
// less than half of one wave (blocks_per_sm blocks on every SM), into about
// kForwardWaves waves; the backward splits it whenever its blocks make fewer
// than kBackwardWaves waves, into that many. Segments are at least
// kMinSegChunks chunks long; the environment variable above overrides all
// that. (With the backward's rule for both, the forward summaries took 8% of
// VMamba-T's bf16 training step at 1024 x 1024, batch 6, on an H200; with
// fewer forward segments, none at its last two stages, its bf16 inference
// took 54.2 ms against 61.2.)
void choose_segments(ScanParams& p, int64_t blocks, int blocks_per_sm,
                     bool backward) {
  int64_t seg_chunks = p.chunks;
  const int64_t forced = segment_chunks_from_env();
  if (forced > 0) {
    seg_chunks = forced;
  } else if (forced < 0 && p.chunks >= 2 * kMinSegChunks) {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          device));
    const int64_t wave = int64_t{sms} * blocks_per_sm;
    const bool split = backward ? blocks < kBackwardWaves * wave : 2 * blocks < wave;
    if (split) {
      const int64_t waves = backward ? kBackwardWaves : kForwardWaves;
      seg_chunks = std::max(kMinSegChunks, ceil_div(p.chunks * blocks, waves * wave));
    }
  }
  // At most 65535 segments (gridDim.y), at most one.
  seg_chunks = std::min(std::max(seg_chunks, ceil_div(p.chunks, 65535)), p.chunks);
  p.seg_chunks = static_cast<int>(seg_chunks);
  p.segments = static_cast<int>(ceil_div(p.chunks, seg_chunks));
}

void launch_carry(const ScanParams& p, bool reverse, cudaStream_t stream) {
  constexpr int kCarryThreads = 256;
  const int64_t rows = p.batch * p.channels * p.d_state;
  scan_carry_kernel<<<static_cast<unsigned>(ceil_div(rows, kCarryThreads)),
                      kCarryThreads, 0, stream>>>(p, reverse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace scan_cuda
}  // namespace mmvmamba
