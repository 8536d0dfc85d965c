// Shared by the CPU kernels that sweep [B, C, H, W] tensors pixel block by pixel block (channel_pool,
// fuse_pyramid): each image is walked in blocks of pixels in memory order (channel-major for contiguous tensors,
// pixel-major for channels_last), so each tensor is read or written once. A block's per-pixel results never
// depend on how the pixels are split into blocks, so the block size may follow the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "huge_pages.h"

// The per-block loops come in an AVX2 and a baseline version, picked at load time (ifunc).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DMGRD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DMGRD_CPU_CLONES
#endif

namespace dmgrd {
namespace pixel_blocks {

constexpr int64_t kMinPixelBlock = 256;
constexpr int64_t kMaxPixelBlock = 4096;     // long contiguous rows stream best
constexpr int64_t kMinTaskElements = 32768;  // smaller inputs run on the calling thread

// at::parallel_for grain for iterations of `elements` elements each.
inline int64_t grain(int64_t elements) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(elements, 1));
}

// A [B, C, H, W] tensor made dense in its dense_format (the outputs follow it), and the sizes the loops need.
struct Dense {
  at::Tensor t;
  int64_t batch, channels, pixels;
  bool channels_last;

  Dense(const at::Tensor& x, at::MemoryFormat format)
      : t(x.contiguous(format)), batch(x.size(0)), channels(x.size(1)), pixels(x.size(2) * x.size(3)),
        channels_last(format == at::MemoryFormat::ChannelsLast) {}
  explicit Dense(const at::Tensor& x) : Dense(x, dense_format(x)) {}

  int64_t image() const { return channels * pixels; }
  // Offset of pixel p's first channel in one image, and between its channels.
  int64_t pixel_offset(int64_t p) const { return channels_last ? p * channels : p; }
  int64_t channel_stride() const { return channels_last ? 1 : pixels; }
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  at::Tensor empty() const { return with_huge_pages(dense_like(t)); }
};

// body(i, offset) for every channel and every pixel p0 + i of [p0, p1) of one image, offset being the element's
// offset in the image, in memory order.
template <typename Body>
inline void for_each_element(const Dense& d, int64_t p0, int64_t p1, const Body& body) {
  if (d.channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < d.channels; ++c) body(p - p0, p * d.channels + c);
    }
  } else {
    for (int64_t c = 0; c < d.channels; ++c) {
      for (int64_t p = p0; p < p1; ++p) body(p - p0, c * d.pixels + p);
    }
  }
}

// Pixels per task: up to kMaxPixelBlock, fewer when whole images would leave threads idle.
inline int64_t pixel_block(const Dense& d) {
  const int64_t blocks_per_image = (2 * at::get_num_threads() + d.batch - 1) / d.batch;
  return std::clamp((d.pixels + blocks_per_image - 1) / blocks_per_image, kMinPixelBlock, kMaxPixelBlock);
}

// block(b, p0, p1) for image b and pixels [p0, p1), in parallel over images and pixel blocks.
template <typename Block>
void parallel_blocks(const Dense& d, const Block& block) {
  const int64_t pixels = d.pixels, size = pixel_block(d);
  const int64_t blocks = (pixels + size - 1) / size;
  at::parallel_for(0, d.batch * blocks, grain(std::min(pixels, size) * d.channels), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * size;
      block(b, p0, std::min(p0 + size, pixels));
    }
  });
}

}  // namespace pixel_blocks
}  // namespace dmgrd
