// Per-element arithmetic of dmgrd::fuse_pyramid shared by the CPU and CUDA kernels, written to match the torch
// reference (dmgrd/ops/fuse_pyramid.py) operation for operation: the attention-mask chain m_L = sigmoid(a_L),
// m_l = sigmoid(a_l) * up(m_{l+1}) with its backward, up being ATen's upsample_bilinear2d (align_corners=True).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace dmgrd {

// Bilinear resampling (align_corners=True) of a [in_h, in_w] plane to [out_h, out_w], as ATen computes it:
// a plane of unchanged size is copied. `sample` reads one output pixel, `scatter` is its adjoint.
template <typename acc_t>
struct Upsample {
  int64_t in_h = 1, in_w = 1, out_h = 1, out_w = 1;
  acc_t scale_h = 0, scale_w = 0;

  static Upsample make(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
    return {in_h, in_w, out_h, out_w, align_corners_scale<acc_t>(in_h, out_h), align_corners_scale<acc_t>(in_w, out_w)};
  }

  DMGRD_HOST_DEVICE bool copy() const { return in_h == out_h && in_w == out_w; }

  DMGRD_HOST_DEVICE LinearTap<acc_t> row(int64_t y) const {
    return copy() ? LinearTap<acc_t>{y, y, acc_t(1), acc_t(0)} : linear_tap(scale_h, y, in_h);
  }

  DMGRD_HOST_DEVICE LinearTap<acc_t> col(int64_t x) const {
    return copy() ? LinearTap<acc_t>{x, x, acc_t(1), acc_t(0)} : linear_tap(scale_w, x, in_w);
  }

  DMGRD_HOST_DEVICE acc_t sample(const acc_t* plane, int64_t y, int64_t x) const {
    const LinearTap<acc_t> r = row(y), c = col(x);
    const acc_t* r0 = plane + r.i0 * in_w;
    const acc_t* r1 = plane + r.i1 * in_w;
    return r.w0 * (c.w0 * r0[c.i0] + c.w1 * r0[c.i1]) + r.w1 * (c.w0 * r1[c.i0] + c.w1 * r1[c.i1]);
  }

  // add(pointer, value) accumulates (a plain += on the CPU, an atomicAdd on the GPU).
  template <typename Add>
  DMGRD_HOST_DEVICE void scatter(acc_t* plane, int64_t y, int64_t x, acc_t v, Add add) const {
    const LinearTap<acc_t> r = row(y), c = col(x);
    acc_t* r0 = plane + r.i0 * in_w;
    acc_t* r1 = plane + r.i1 * in_w;
    add(r0 + c.i0, r.w0 * c.w0 * v);
    add(r0 + c.i1, r.w0 * c.w1 * v);
    add(r1 + c.i0, r.w1 * c.w0 * v);
    add(r1 + c.i1, r.w1 * c.w1 * v);
  }
};

// Attention mask at pixel (y, x) of a level from s = sigmoid(logit) there: s * up(coarser mask), or s for the
// coarsest level (coarse == nullptr).
template <typename acc_t>
DMGRD_HOST_DEVICE inline acc_t mask_at(acc_t s, const acc_t* coarse, const Upsample<acc_t>& up, int64_t y, int64_t x) {
  return coarse == nullptr ? s : s * up.sample(coarse, y, x);
}

// Backward of mask_at: returns dL/dlogit given dL/dmask and scatters dL/dup(coarser mask) into coarse_grad.
template <typename acc_t, typename Add>
DMGRD_HOST_DEVICE inline acc_t mask_backward_at(acc_t s, acc_t grad_mask, const acc_t* coarse, acc_t* coarse_grad,
                                                const Upsample<acc_t>& up, int64_t y, int64_t x, Add add) {
  acc_t grad_s = grad_mask;
  if (coarse != nullptr) {
    up.scatter(coarse_grad, y, x, grad_mask * s, add);
    grad_s = grad_mask * up.sample(coarse, y, x);
  }
  return grad_s * (acc_t(1) - s) * s;
}

inline void check_fuse_pyramid_args(const at::TensorList& features, const at::TensorList& logits) {
  TORCH_CHECK(!features.empty(), "dmgrd::fuse_pyramid: no levels");
  TORCH_CHECK(features.size() == logits.size(), "dmgrd::fuse_pyramid: ", features.size(), " feature levels but ",
              logits.size(), " logit levels");
  const at::Tensor& first = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    const at::Tensor& a = logits[l];
    TORCH_CHECK(f.dim() == 4 && a.dim() == 4 && a.size(1) == 1 && f.size(0) == a.size(0) && f.size(2) == a.size(2) &&
                    f.size(3) == a.size(3) && f.size(0) == first.size(0),
                "dmgrd::fuse_pyramid: level ", l, " needs features [B, C, H, W] and logits [B, 1, H, W], got ",
                f.sizes(), " and ", a.sizes());
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, "dmgrd::fuse_pyramid: level ", l, " is empty: ", f.sizes());
    TORCH_CHECK(f.is_floating_point() && f.scalar_type() == first.scalar_type() &&
                    a.scalar_type() == first.scalar_type(),
                "dmgrd::fuse_pyramid: features and logits must share one floating dtype");
    TORCH_CHECK(f.device() == first.device() && a.device() == first.device(),
                "dmgrd::fuse_pyramid: all tensors must be on one device");
  }
}

inline void check_fuse_pyramid_backward_args(const at::TensorList& grads, const at::TensorList& features,
                                             const at::TensorList& logits) {
  check_fuse_pyramid_args(features, logits);
  TORCH_CHECK(grads.size() == features.size(), "dmgrd::fuse_pyramid_backward: ", grads.size(), " gradients for ",
              features.size(), " levels");
  for (size_t l = 0; l < grads.size(); ++l) {
    TORCH_CHECK(grads[l].sizes() == features[l].sizes() && grads[l].scalar_type() == features[l].scalar_type() &&
                    grads[l].device() == features[l].device(),
                "dmgrd::fuse_pyramid_backward: gradient ", l, " must match its features ", features[l].sizes());
  }
}

}  // namespace dmgrd
