// Pixel tiles shared by the CUDA kernels that sweep [B, C, H, W] tensors (channel_pool, fuse_pyramid): blocks of
// kPixelsPerBlock pixels of the flattened [B, H*W] range times kChannelGroups channel groups; thread (x, y)
// walks channels y, y + kChannelGroups, ... of its pixel, and channel reductions finish in shared memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "launch.cuh"

namespace dmgrd::cuda_pixel_tiles {

constexpr int kPixelsPerBlock = 32;  // blockDim.x of the channel loops
constexpr int kChannelGroups = 8;    // blockDim.y of the channel loops

// One pixel of the flattened [B, H*W] range: image b, flat index p in the image, row h, column w.
struct Pixel {
  int64_t b, p, h, w;
  bool valid;

  __device__ Pixel(int64_t index, int64_t pixels, int64_t width, int64_t total)
      : b(index / pixels), p(index % pixels), h(p / width), w(p % width), valid(index < total) {}
  __device__ int64_t offset(const Strides4& s) const { return b * s.b + h * s.h + w * s.w; }
  __device__ int64_t flat(int64_t pixels) const { return b * pixels + p; }
};

__device__ inline Pixel tile_pixel(int64_t pixels, int64_t width, int64_t total) {
  return Pixel(static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock + threadIdx.x, pixels, width, total);
}

__device__ inline Pixel thread_pixel(int64_t pixels, int64_t width, int64_t total) {
  return Pixel(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, pixels, width, total);
}

inline unsigned int blocks_for(int64_t total, int64_t per_block) {
  return grid_x(ceil_div(total, per_block), "pixel tiles");
}

inline const dim3 kTileBlock(kPixelsPerBlock, kChannelGroups);

inline void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "dmgrd::", op, " (CUDA): expected CUDA tensors, got ", x.device());
}

}  // namespace dmgrd::cuda_pixel_tiles
