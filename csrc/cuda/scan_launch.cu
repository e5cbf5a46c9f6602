// Host code shared by the CUDA scans: what the launches ask of the driver
// (kept per device), the segment choice and the kernel chaining the
// segments' summaries (scan_launch.cuh says how they work).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../segments.h"
#include "scan_launch.cuh"

namespace mmvmamba {
namespace scan_cuda {
namespace {

// Chains the segment summaries into the carry entering each segment, one
// thread per (batch, channel, state): forward, the true start state h_s of
// segment s (h_0 = 0, h_{s+1} = exp2(a dt_s) h_s + end_s); reverse, the
// carry from its right (c_{S-1} = 0, c_{s-1} = exp2(a dt_s) c_s + out_s).
// Each replaces the summary in seg_state; the skipped segment's (never
// written) is only overwritten. The chain is serial, so its loads come
// kCarryBatch segments at a time, ahead of the batch's stores: one memory
// latency a batch instead of one a segment (Mask R-CNN's backward walks 44
// segments at stage 0).
constexpr int kCarryBatch = 8;

__global__ void scan_carry_kernel(const ScanParams p, bool reverse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.channels * p.d_state) return;
  const int64_t row = i / p.d_state;  // b * channels + d
  const int64_t n = i % p.d_state;
  const float a = p.A[(row % p.channels) * p.d_state + n] * kLog2e;
  float* state = p.seg_state + row * p.segments * p.d_state + n;
  const float* dt_sum = p.seg_dt + row * p.segments;
  // The k-th segment the carry crosses (k < p.segments - 1 read, all written).
  const auto segment = [&](int k) { return reverse ? p.segments - 1 - k : k; };
  const int crossed = p.segments - 1;
  float carry = 0.0f;
  for (int k0 = 0; k0 < crossed; k0 += kCarryBatch) {
    float summary[kCarryBatch], decay[kCarryBatch];
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      if (k0 + j < crossed) {
        const int seg = segment(k0 + j);
        summary[j] = state[seg * p.d_state];
        decay[j] = exp2f(a * dt_sum[seg]);
      }
    }
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      if (k0 + j < crossed) {
        state[segment(k0 + j) * p.d_state] = carry;
        carry = decay[j] * carry + summary[j];
      }
    }
  }
  state[segment(crossed) * p.d_state] = carry;
}

// A kernel on a device, with its threads and dynamic shared memory a block.
using KernelKey = std::tuple<int, const void*, int, int>;

// What the launch code has learnt from the driver, which it needs at every
// launch: each device's SMs, the dynamic shared memory each kernel is
// allowed on each device, and the blocks an SM holds of a kernel at a size.
struct DeviceFacts {
  std::mutex mutex;
  std::map<int, int> sms;
  std::map<std::pair<int, const void*>, int> allowed;
  std::map<KernelKey, int> resident;
};

DeviceFacts& device_facts() {
  static DeviceFacts facts;
  return facts;
}

// Raises `kernel`'s limit on `device` to `smem` bytes where lower; with the
// facts' lock held.
void raise_limit(DeviceFacts& facts, int device, const void* kernel, int smem) {
  int& allowed = facts.allowed[{device, kernel}];
  if (allowed >= smem) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  allowed = smem;
}

}  // namespace

int device_sms() {
  const int device = c10::cuda::current_device();
  DeviceFacts& facts = device_facts();
  std::lock_guard<std::mutex> lock(facts.mutex);
  const auto found = facts.sms.find(device);
  if (found != facts.sms.end()) return found->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        device));
  facts.sms.emplace(device, sms);
  return sms;
}

void allow_shared_bytes(const void* kernel, int smem) {
  const int device = c10::cuda::current_device();
  DeviceFacts& facts = device_facts();
  std::lock_guard<std::mutex> lock(facts.mutex);
  raise_limit(facts, device, kernel, smem);
}

int resident_blocks(const void* kernel, int threads, int smem) {
  const int device = c10::cuda::current_device();
  DeviceFacts& facts = device_facts();
  std::lock_guard<std::mutex> lock(facts.mutex);
  const KernelKey key{device, kernel, threads, smem};
  const auto found = facts.resident.find(key);
  if (found != facts.resident.end()) return found->second;
  raise_limit(facts, device, kernel, smem);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, kernel, threads, smem));
  facts.resident.emplace(key, blocks);
  return blocks;
}

// Sets p.seg_chunks / p.segments for a launch of `blocks` blocks per
// segment of the forward or backward pass, by segment_chunks() (segments.h)
// with a wave of blocks_per_sm blocks on every SM of the current device.
void choose_segments(ScanParams& p, int64_t blocks, int blocks_per_sm,
                     bool backward) {
  const int64_t forced = segment_chunks_from_env();
  int64_t wave = 0;
  if (segments_need_wave(p.chunks, forced)) {
    wave = int64_t{device_sms()} * blocks_per_sm;
  }
  const int64_t seg_chunks = segment_chunks(p.chunks, blocks, wave, backward, forced);
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
