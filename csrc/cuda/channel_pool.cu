// CUDA kernels of dmgrd::channel_pool, forward and backward, over the pixel tiles of pixel_tiles.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../channel_pool.h"
#include "launch.cuh"
#include "pixel_tiles.cuh"

namespace dmgrd::cuda_channel_pool {
namespace {

using namespace dmgrd::cuda_pixel_tiles;  // NOLINT(build/namespaces)

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelsPerBlock* kChannelGroups)
    channel_pool_kernel(const scalar_t* __restrict__ x, Strides4 xs, int64_t channels, int64_t pixels,
                        int64_t width, int64_t total, scalar_t* __restrict__ pooled, int32_t* __restrict__ ties) {
  __shared__ acc_t part_max[kChannelGroups][kPixelsPerBlock];
  __shared__ int32_t part_count[kChannelGroups][kPixelsPerBlock];
  __shared__ acc_t part_sum[kChannelGroups][kPixelsPerBlock];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const Pixel px = tile_pixel(pixels, width, total);
  const scalar_t* in = x + (px.valid ? px.offset(xs) : 0);
  acc_t max = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  int32_t count = 0;
  if (px.valid) {
    for (int64_t c = ty; c < channels; c += kChannelGroups) {
      const acc_t v = static_cast<acc_t>(in[c * xs.c]);
      max_count_update(max, count, v, 1);
      sum += v;
    }
  }
  part_max[ty][tx] = max;
  part_count[ty][tx] = count;
  part_sum[ty][tx] = sum;
  __syncthreads();
  if (ty != 0 || !px.valid) return;
  for (int g = 1; g < kChannelGroups; ++g) {
    max_count_update(max, count, part_max[g][tx], part_count[g][tx]);
    sum += part_sum[g][tx];
  }
  pooled[2 * px.b * pixels + px.p] = static_cast<scalar_t>(channel_max(max, sum, in, xs.c, channels));
  pooled[(2 * px.b + 1) * pixels + px.p] = static_cast<scalar_t>(sum / static_cast<acc_t>(channels));
  ties[px.flat(pixels)] = count;
}

// grad and pooled are contiguous [B, 2, H, W].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelsPerBlock* kChannelGroups)
    channel_pool_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, Strides4 xs,
                                 const scalar_t* __restrict__ pooled, const int32_t* __restrict__ ties,
                                 scalar_t* __restrict__ grad_x, Strides4 gs, int64_t channels, int64_t pixels,
                                 int64_t width, int64_t total) {
  const Pixel px = tile_pixel(pixels, width, total);
  if (!px.valid) return;
  const int64_t max_index = 2 * px.b * pixels + px.p;
  const acc_t max = static_cast<acc_t>(pooled[max_index]);
  const acc_t share = static_cast<acc_t>(grad[max_index]) / static_cast<acc_t>(ties[px.flat(pixels)]);
  const acc_t mean_share = static_cast<acc_t>(grad[max_index + pixels]) / static_cast<acc_t>(channels);
  const scalar_t* in = x + px.offset(xs);
  scalar_t* out = grad_x + px.offset(gs);
  for (int64_t c = threadIdx.y; c < channels; c += kChannelGroups) {
    const acc_t hit = static_cast<acc_t>(in[c * xs.c]) == max ? acc_t(1) : acc_t(0);
    out[c * gs.c] = static_cast<scalar_t>(hit * share + mean_share);
  }
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x) {
  check_channel_pool_args(x);
  check_cuda(x, "channel_pool");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  at::Tensor pooled = at::empty({batch, 2, height, width}, x.options());
  at::Tensor ties = at::empty({batch, height, width}, x.options().dtype(at::kInt));
  const int64_t total = batch * height * width;
  if (total == 0) return {pooled, ties};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dmgrd_channel_pool_cuda", [&] {
    channel_pool_kernel<scalar_t, at::opmath_type<scalar_t>><<<blocks_for(total, kPixelsPerBlock), kTileBlock, 0,
                                                                 stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), channels, height * width, width, total,
        pooled.mutable_data_ptr<scalar_t>(), ties.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pooled, ties};
}

at::Tensor channel_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& pooled_in,
                                      const at::Tensor& ties_in) {
  check_channel_pool_backward_args(grad_in, x, pooled_in, ties_in);
  check_cuda(x, "channel_pool_backward");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor grad = grad_in.contiguous(), pooled = pooled_in.contiguous(), ties = ties_in.contiguous();
  at::Tensor grad_x = dense_like(x);
  const int64_t channels = x.size(1), width = x.size(3), pixels = x.size(2) * width, total = x.size(0) * pixels;
  if (total == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dmgrd_channel_pool_backward_cuda", [&] {
    channel_pool_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
        <<<blocks_for(total, kPixelsPerBlock), kTileBlock, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), strides_of(x),
            pooled.const_data_ptr<scalar_t>(), ties.const_data_ptr<int32_t>(), grad_x.mutable_data_ptr<scalar_t>(),
            strides_of(grad_x), channels, pixels, width, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace
}  // namespace dmgrd::cuda_channel_pool

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) {
  m.impl("channel_pool", &dmgrd::cuda_channel_pool::channel_pool_cuda);
  m.impl("channel_pool_backward", &dmgrd::cuda_channel_pool::channel_pool_backward_cuda);
}
