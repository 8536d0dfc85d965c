// CPU kernels of dmgrd::fuse_pyramid, forward and backward. The passes over the big [B, C, H, W] tensors walk
// each image in blocks of pixels (pixel_blocks.h); the small per-pixel maps (masks, mask gradients) are float32
// (float64 for float64 inputs), [B, H*W] contiguous.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../fuse_pyramid.h"
#include "pixel_blocks.h"


namespace dmgrd {
namespace {

using pixel_blocks::Dense;
using pixel_blocks::grain;
using pixel_blocks::parallel_blocks;
using pixel_blocks::for_each_element;

template <typename acc_t>
Upsample<acc_t> level_upsample(const at::TensorList& logits, size_t l) {
  if (l + 1 == logits.size()) return {};
  return Upsample<acc_t>::make(logits[l + 1].size(2), logits[l + 1].size(3), logits[l].size(2), logits[l].size(3));
}

// sigmoid of every level's logits, [B, H_l * W_l] in acc_t (ATen's vectorised kernel).
template <typename acc_t>
std::vector<at::Tensor> sigmoids(const at::TensorList& logits) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& a : logits) {
    out.push_back(at::sigmoid(a.to(c10::CppTypeToScalarType<acc_t>::value)).reshape({a.size(0), -1}).contiguous());
  }
  return out;
}

// The attention masks [B, H_l * W_l] of every level from the sigmoids of the logits, computed coarse to fine.
template <typename acc_t>
std::vector<at::Tensor> attention_masks(const at::TensorList& logits, const std::vector<at::Tensor>& sig) {
  const size_t levels = logits.size();
  std::vector<at::Tensor> masks(levels);
  for (size_t l = levels; l-- > 0;) {
    masks[l] = at::empty_like(sig[l]);
    const int64_t batch = logits[l].size(0), height = logits[l].size(2), width = logits[l].size(3);
    const Upsample<acc_t> up = level_upsample<acc_t>(logits, l);
    const acc_t* coarse = l + 1 < levels ? masks[l + 1].template const_data_ptr<acc_t>() : nullptr;
    const int64_t coarse_plane = up.in_h * up.in_w;
    const acc_t* s = sig[l].template const_data_ptr<acc_t>();
    acc_t* out = masks[l].template mutable_data_ptr<acc_t>();
    at::parallel_for(0, batch * height, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / height, y = row % height;
        const acc_t* plane = coarse == nullptr ? nullptr : coarse + b * coarse_plane;
        for (int64_t x = 0; x < width; ++x) out[row * width + x] = mask_at(s[row * width + x], plane, up, y, x);
      }
    });
  }
  return masks;
}

// out = f * mask for pixels [p0, p1) of image b (mask [B, H*W]).
template <typename scalar_t, typename acc_t>
DMGRD_CPU_CLONES void gate_block(const Dense& f, int64_t b, int64_t p0, int64_t p1, const acc_t* mask,
                                 scalar_t* out) {
  const acc_t* m = mask + b * f.pixels + p0;
  const scalar_t* image = f.t.const_data_ptr<scalar_t>() + b * f.image();
  scalar_t* out_image = out + b * f.image();
  for_each_element(f, p0, p1, [&](int64_t i, int64_t offset) {
    out_image[offset] = static_cast<scalar_t>(static_cast<acc_t>(image[offset]) * m[i]);
  });
}

template <typename scalar_t>
std::vector<at::Tensor> fuse_pyramid_typed(const at::TensorList& features, const at::TensorList& logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<at::Tensor> masks = attention_masks<acc_t>(logits, sigmoids<acc_t>(logits));
  std::vector<at::Tensor> outputs;
  for (size_t l = 0; l < features.size(); ++l) {
    const Dense f(features[l]);
    at::Tensor out = f.empty();
    const acc_t* mask = masks[l].const_data_ptr<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    parallel_blocks(f, [&](int64_t b, int64_t p0, int64_t p1) { gate_block(f, b, p0, p1, mask, o); });
    outputs.push_back(out);
  }
  return outputs;
}

std::vector<at::Tensor> fuse_pyramid_cpu(at::TensorList features, at::TensorList logits) {
  check_fuse_pyramid_args(features, logits);
  std::vector<at::Tensor> outputs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "dmgrd_fuse_pyramid_cpu",
                                  [&] { outputs = fuse_pyramid_typed<scalar_t>(features, logits); });
  return outputs;
}

// grad_f = grad * mask and grad_mask = sum_c grad * f for pixels [p0, p1) of image b (grad laid out as f;
// mask and grad_mask [B, H*W]).
template <typename scalar_t, typename acc_t>
DMGRD_CPU_CLONES void gate_backward_block(const Dense& f, int64_t b, int64_t p0, int64_t p1, const scalar_t* grad,
                                          const acc_t* mask, scalar_t* grad_f, acc_t* grad_mask) {
  std::vector<acc_t> dot(p1 - p0, acc_t(0));
  acc_t* d = dot.data();
  const acc_t* m = mask + b * f.pixels + p0;
  const scalar_t* g_image = grad + b * f.image();
  const scalar_t* f_image = f.t.const_data_ptr<scalar_t>() + b * f.image();
  scalar_t* gf_image = grad_f + b * f.image();
  for_each_element(f, p0, p1, [&](int64_t i, int64_t offset) {
    const acc_t gv = static_cast<acc_t>(g_image[offset]);
    gf_image[offset] = static_cast<scalar_t>(gv * m[i]);
    d[i] += gv * static_cast<acc_t>(f_image[offset]);
  });
  std::copy(dot.begin(), dot.end(), grad_mask + b * f.pixels + p0);
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> gate_backward(const at::Tensor& grad, const Dense& f, const at::Tensor& mask) {
  const at::Tensor g = grad.contiguous(f.format());
  at::Tensor grad_f = f.empty();
  at::Tensor grad_mask = at::empty_like(mask);
  const scalar_t* g_in = g.const_data_ptr<scalar_t>();
  const acc_t* m = mask.const_data_ptr<acc_t>();
  scalar_t* gf = grad_f.mutable_data_ptr<scalar_t>();
  acc_t* gm = grad_mask.mutable_data_ptr<acc_t>();
  parallel_blocks(f, [&](int64_t b, int64_t p0, int64_t p1) { gate_backward_block(f, b, p0, p1, g_in, m, gf, gm); });
  return {grad_f, grad_mask};
}

// Gradients of the logits, fine to coarse: each level adds its share of the gradient of up(coarser mask)
// into the coarser level's mask gradient before that level is processed. Parallel over images.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> logits_backward(const at::TensorList& logits, const std::vector<at::Tensor>& sig,
                                        const std::vector<at::Tensor>& masks, std::vector<at::Tensor>& grad_masks) {
  const size_t levels = logits.size();
  std::vector<at::Tensor> grad_logits;
  for (size_t l = 0; l < levels; ++l) {
    const at::Tensor& a = logits[l];
    at::Tensor grad_a = at::empty(a.sizes(), a.options());
    const int64_t batch = a.size(0), width = a.size(3), pixels = a.size(2) * width;
    const Upsample<acc_t> up = level_upsample<acc_t>(logits, l);
    const bool coarsest = l + 1 == levels;
    const int64_t coarse_plane = up.in_h * up.in_w;
    const acc_t* s = sig[l].template const_data_ptr<acc_t>();
    const acc_t* gm = grad_masks[l].template const_data_ptr<acc_t>();
    const acc_t* coarse = coarsest ? nullptr : masks[l + 1].template const_data_ptr<acc_t>();
    acc_t* coarse_grad = coarsest ? nullptr : grad_masks[l + 1].template mutable_data_ptr<acc_t>();
    scalar_t* out = grad_a.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain(pixels), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t* plane = coarsest ? nullptr : coarse + b * coarse_plane;
        acc_t* grad_plane = coarsest ? nullptr : coarse_grad + b * coarse_plane;
        for (int64_t p = b * pixels; p < (b + 1) * pixels; ++p) {
          const int64_t y = (p % pixels) / width, x = p % width;
          const acc_t ga = mask_backward_at(s[p], gm[p], plane, grad_plane, up, y, x,
                                            [](acc_t* dst, acc_t v) { *dst += v; });
          out[p] = static_cast<scalar_t>(ga);
        }
      }
    });
    grad_logits.push_back(grad_a);
  }
  return grad_logits;
}

template <typename scalar_t>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fuse_pyramid_backward_typed(
    const at::TensorList& grads, const at::TensorList& features, const at::TensorList& logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<at::Tensor> sig = sigmoids<acc_t>(logits);
  const std::vector<at::Tensor> masks = attention_masks<acc_t>(logits, sig);
  std::vector<at::Tensor> grad_features, grad_masks;
  for (size_t l = 0; l < features.size(); ++l) {
    auto [grad_f, grad_mask] = gate_backward<scalar_t, acc_t>(grads[l], Dense(features[l]), masks[l]);
    grad_features.push_back(grad_f);
    grad_masks.push_back(grad_mask);
  }
  return {grad_features, logits_backward<scalar_t, acc_t>(logits, sig, masks, grad_masks)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fuse_pyramid_backward_cpu(
    at::TensorList grads, at::TensorList features, at::TensorList logits) {
  check_fuse_pyramid_backward_args(grads, features, logits);
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(),
                                  "dmgrd_fuse_pyramid_backward_cpu",
                                  [&] { result = fuse_pyramid_backward_typed<scalar_t>(grads, features, logits); });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) {
  m.impl("fuse_pyramid", &fuse_pyramid_cpu);
  m.impl("fuse_pyramid_backward", &fuse_pyramid_backward_cpu);
}

}  // namespace dmgrd
