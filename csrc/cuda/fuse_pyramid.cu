// CUDA kernels of dmgrd::fuse_pyramid, forward and backward. The passes over [B, C, H, W] tensors (any strides)
// use the pixel tiles of pixel_tiles.cuh; the per-pixel maps (masks, mask gradients) are float32 (float64 for
// float64 inputs) [B, H*W], one thread per pixel.
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
#include <vector>

#include "../fuse_pyramid.h"
#include "launch.cuh"
#include "pixel_tiles.cuh"

namespace dmgrd::cuda_fuse_pyramid {
namespace {

using namespace dmgrd::cuda_pixel_tiles;  // NOLINT(build/namespaces)

constexpr int kMapThreads = 256;     // blockDim.x of the per-pixel kernels

__device__ inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ inline double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

struct AtomicAdd {
  template <typename T>
  __host__ __device__ void operator()(T* dst, T v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(dst, v);
#endif
  }
};

// Masks of one level from its logits and the coarser level's mask (nullptr for the coarsest).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMapThreads)
    mask_kernel(const scalar_t* __restrict__ logits, Strides4 as, const acc_t* __restrict__ coarse,
                Upsample<acc_t> up, int64_t pixels, int64_t width, int64_t total, acc_t* __restrict__ masks) {
  const Pixel px = thread_pixel(pixels, width, total);
  if (!px.valid) return;
  const acc_t* plane = coarse == nullptr ? nullptr : coarse + px.b * up.in_h * up.in_w;
  masks[px.flat(pixels)] = mask_at(sigmoid(static_cast<acc_t>(logits[px.offset(as)])), plane, up, px.h, px.w);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelsPerBlock* kChannelGroups)
    gate_kernel(const scalar_t* __restrict__ features, Strides4 fs, const acc_t* __restrict__ masks,
                scalar_t* __restrict__ out, Strides4 os, int64_t channels, int64_t pixels, int64_t width,
                int64_t total) {
  const Pixel px = tile_pixel(pixels, width, total);
  if (!px.valid) return;
  const acc_t m = masks[px.flat(pixels)];
  const scalar_t* in = features + px.offset(fs);
  scalar_t* o = out + px.offset(os);
  for (int64_t c = threadIdx.y; c < channels; c += kChannelGroups) {
    o[c * os.c] = static_cast<scalar_t>(static_cast<acc_t>(in[c * fs.c]) * m);
  }
}

// grad_f = grad * mask, and grad_mask = sum_c grad * f per pixel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelsPerBlock* kChannelGroups)
    gate_backward_kernel(const scalar_t* __restrict__ grad, Strides4 gs, const scalar_t* __restrict__ features,
                         Strides4 fs, const acc_t* __restrict__ masks, scalar_t* __restrict__ grad_f, Strides4 gfs,
                         acc_t* __restrict__ grad_masks, int64_t channels, int64_t pixels, int64_t width,
                         int64_t total) {
  __shared__ acc_t partial[kChannelGroups][kPixelsPerBlock];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const Pixel px = tile_pixel(pixels, width, total);
  acc_t dot = 0;
  if (px.valid) {
    const acc_t m = masks[px.flat(pixels)];
    const scalar_t* g = grad + px.offset(gs);
    const scalar_t* f = features + px.offset(fs);
    scalar_t* gf = grad_f + px.offset(gfs);
    for (int64_t c = ty; c < channels; c += kChannelGroups) {
      const acc_t gv = static_cast<acc_t>(g[c * gs.c]);
      gf[c * gfs.c] = static_cast<scalar_t>(gv * m);
      dot += gv * static_cast<acc_t>(f[c * fs.c]);
    }
  }
  partial[ty][tx] = dot;
  __syncthreads();
  if (ty != 0 || !px.valid) return;
  for (int g = 1; g < kChannelGroups; ++g) dot += partial[g][tx];
  grad_masks[px.flat(pixels)] = dot;
}

// Gradient of one level's logits; adds this level's share of the gradient of up(coarser mask) into
// coarse_grad (atomically: several pixels read each coarse pixel).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMapThreads)
    mask_backward_kernel(const scalar_t* __restrict__ logits, Strides4 as, const acc_t* __restrict__ grad_masks,
                         const acc_t* __restrict__ coarse, acc_t* __restrict__ coarse_grad, Upsample<acc_t> up,
                         int64_t pixels, int64_t width, int64_t total, scalar_t* __restrict__ grad_logits) {
  const Pixel px = thread_pixel(pixels, width, total);
  if (!px.valid) return;
  const int64_t plane = px.b * up.in_h * up.in_w;
  const bool coarsest = coarse == nullptr;
  const acc_t ga = mask_backward_at(sigmoid(static_cast<acc_t>(logits[px.offset(as)])), grad_masks[px.flat(pixels)],
                                    coarsest ? nullptr : coarse + plane, coarsest ? nullptr : coarse_grad + plane,
                                    up, px.h, px.w, AtomicAdd());
  grad_logits[px.flat(pixels)] = static_cast<scalar_t>(ga);
}

// Pixel count, width and flattened [B, H*W] total of a [B, C, H, W] level.
struct Extent {
  int64_t pixels, width, total;
  explicit Extent(const at::Tensor& x) : pixels(x.size(2) * x.size(3)), width(x.size(3)), total(x.size(0) * pixels) {}
};

template <typename acc_t>
Upsample<acc_t> level_upsample(const at::TensorList& logits, size_t l) {
  if (l + 1 == logits.size()) return {};
  return Upsample<acc_t>::make(logits[l + 1].size(2), logits[l + 1].size(3), logits[l].size(2), logits[l].size(3));
}

// The attention masks [B, H_l * W_l] of every level, computed coarse to fine.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> attention_masks(const at::TensorList& logits, cudaStream_t stream) {
  std::vector<at::Tensor> masks(logits.size());
  for (size_t l = logits.size(); l-- > 0;) {
    const at::Tensor& a = logits[l];
    const Extent e(a);
    masks[l] = at::empty({a.size(0), e.pixels}, a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const acc_t* coarse = l + 1 < logits.size() ? masks[l + 1].template const_data_ptr<acc_t>() : nullptr;
    mask_kernel<scalar_t, acc_t><<<blocks_for(e.total, kMapThreads), kMapThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), strides_of(a), coarse, level_upsample<acc_t>(logits, l), e.pixels, e.width,
        e.total, masks[l].template mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return masks;
}

void check_fuse_pyramid_cuda(const at::TensorList& features) {
  check_cuda(features[0], "fuse_pyramid");
  TORCH_CHECK(features[0].size(0) > 0, "dmgrd::fuse_pyramid (CUDA): empty batch");
}

std::vector<at::Tensor> fuse_pyramid_cuda(at::TensorList features, at::TensorList logits) {
  check_fuse_pyramid_args(features, logits);
  check_fuse_pyramid_cuda(features);
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> outputs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "dmgrd_fuse_pyramid_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<at::Tensor> masks = attention_masks<scalar_t, acc_t>(logits, stream);
    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const Extent e(f);
      at::Tensor out = dense_like(f);
      gate_kernel<scalar_t, acc_t><<<blocks_for(e.total, kPixelsPerBlock), kTileBlock, 0, stream>>>(
          f.const_data_ptr<scalar_t>(), strides_of(f), masks[l].template const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), strides_of(out), f.size(1), e.pixels, e.width, e.total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      outputs.push_back(out);
    }
  });
  return outputs;
}

// Gradients of the logits, fine to coarse: each level adds its share of the gradient of up(coarser mask)
// into the coarser level's mask gradient before that level's kernel runs.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> logits_backward(const at::TensorList& logits, const std::vector<at::Tensor>& masks,
                                        std::vector<at::Tensor>& grad_masks, cudaStream_t stream) {
  std::vector<at::Tensor> grad_logits;
  for (size_t l = 0; l < logits.size(); ++l) {
    const at::Tensor& a = logits[l];
    const Extent e(a);
    const bool coarsest = l + 1 == logits.size();
    at::Tensor grad_a = at::empty(a.sizes(), a.options());
    mask_backward_kernel<scalar_t, acc_t><<<blocks_for(e.total, kMapThreads), kMapThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), strides_of(a), grad_masks[l].template const_data_ptr<acc_t>(),
        coarsest ? nullptr : masks[l + 1].template const_data_ptr<acc_t>(),
        coarsest ? nullptr : grad_masks[l + 1].template mutable_data_ptr<acc_t>(), level_upsample<acc_t>(logits, l),
        e.pixels, e.width, e.total, grad_a.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_logits.push_back(grad_a);
  }
  return grad_logits;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fuse_pyramid_backward_cuda(
    at::TensorList grads, at::TensorList features, at::TensorList logits) {
  check_fuse_pyramid_backward_args(grads, features, logits);
  check_fuse_pyramid_cuda(features);
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grad_features, grad_masks, grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(),
                                  "dmgrd_fuse_pyramid_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<at::Tensor> masks = attention_masks<scalar_t, acc_t>(logits, stream);
    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const at::Tensor& g = grads[l];
      const Extent e(f);
      at::Tensor grad_f = dense_like(f);
      at::Tensor grad_mask = at::empty_like(masks[l]);
      gate_backward_kernel<scalar_t, acc_t><<<blocks_for(e.total, kPixelsPerBlock), kTileBlock, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), strides_of(g), f.const_data_ptr<scalar_t>(), strides_of(f),
          masks[l].template const_data_ptr<acc_t>(), grad_f.mutable_data_ptr<scalar_t>(), strides_of(grad_f),
          grad_mask.template mutable_data_ptr<acc_t>(), f.size(1), e.pixels, e.width, e.total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_features.push_back(grad_f);
      grad_masks.push_back(grad_mask);
    }
    grad_logits = logits_backward<scalar_t, acc_t>(logits, masks, grad_masks, stream);
  });
  return {grad_features, grad_logits};
}

}  // namespace
}  // namespace dmgrd::cuda_fuse_pyramid

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) {
  m.impl("fuse_pyramid", &dmgrd::cuda_fuse_pyramid::fuse_pyramid_cuda);
  m.impl("fuse_pyramid_backward", &dmgrd::cuda_fuse_pyramid::fuse_pyramid_backward_cuda);
}
