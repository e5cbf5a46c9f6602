// The segment rule of the CUDA scans (segments.h).
#include "segments.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "scan.h"

namespace mmvmamba {
namespace {

constexpr const char* kSegmentChunksEnv = "MMVMAMBA_SCAN_SEGMENT_CHUNKS";

}  // namespace

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

int64_t segment_chunks(int64_t chunks, int64_t blocks, int64_t wave,
                       bool backward, int64_t forced) {
  int64_t seg_chunks = chunks;
  if (forced > 0) {
    seg_chunks = forced;
  } else if (segments_need_wave(chunks, forced)) {
    const bool split =
        backward ? blocks < kBackwardWaves * wave : 2 * blocks < wave;
    if (split) {
      const int64_t waves = backward ? kBackwardWaves : kForwardWaves;
      seg_chunks = std::max(kMinSegChunks, ceil_div(chunks * blocks, waves * wave));
    }
  }
  return std::min(std::max(seg_chunks, ceil_div(chunks, kMaxSegments)), chunks);
}

}  // namespace mmvmamba
