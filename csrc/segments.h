// How the CUDA scans split a sequence into segments scanned in parallel
// (csrc/cuda/scan_launch.cuh says what a segment costs). Host code only,
// built with and without CUDA, so that the rule can be checked anywhere:
// _C exports segment_chunks() (csrc/ops.cpp).
#pragma once

#include <cstdint>

namespace mmvmamba {

// Segments are at least this many chunks long (unless forced).
constexpr int64_t kMinSegChunks = 4;
// Waves of blocks a split sequence is cut for, by pass.
constexpr int64_t kForwardWaves = 2;
constexpr int64_t kBackwardWaves = 4;
// At most this many segments (CUDA's gridDim.y).
constexpr int64_t kMaxSegments = 65535;

// MMVMAMBA_SCAN_SEGMENT_CHUNKS: -1 when unset or empty, else its value (an
// error naming the variable when it is not a non-negative integer).
int64_t segment_chunks_from_env();

// Whether segment_chunks() needs `wave` (so the launch code asks the device
// for its SM count only then).
inline bool segments_need_wave(int64_t chunks, int64_t forced) {
  return forced < 0 && chunks >= 2 * kMinSegChunks;
}

// Chunks per segment of a pass over `chunks` chunks with `blocks` blocks per
// segment, `wave` blocks filling the GPU once (SMs x blocks per SM), and
// `forced` from segment_chunks_from_env(). Every segment but one costs a
// summary pass over its chunks: about two thirds of a full pass forward (the
// whole recurrence, without C and y), about a sixth backward (the carry of
// dh alone). So the forward splits the sequence only when its blocks fill
// less than half of one wave, into about kForwardWaves waves; the backward
// whenever its blocks make fewer than kBackwardWaves waves, into that many.
// Segments are at least kMinSegChunks chunks long; forced > 0 sets their
// length, 0 gives one segment. The result lies in [ceil(chunks /
// kMaxSegments), chunks]. (With the backward's rule for both passes, the
// forward summaries took 8% of VMamba-T's bf16 training step at 1024 x 1024,
// batch 6, on an H200; with fewer forward segments, none at its last two
// stages, its bf16 inference took 54.2 ms against 61.2.)
int64_t segment_chunks(int64_t chunks, int64_t blocks, int64_t wave,
                       bool backward, int64_t forced);

}  // namespace mmvmamba
