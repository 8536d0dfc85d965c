// Per-element arithmetic of dmgrd::channel_pool shared by the CPU and CUDA kernels, written to match the torch
// reference (dmgrd/ops/channel_pool.py): the running channel max with its tie count, and the argument checks.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace dmgrd {

// Folds `n` values equal to `v` into a running channel maximum and the number of channels that reach it
// (NaN is skipped here: see channel_max). Only selects, no conditional floating-point arithmetic, so that
// the CPU loops vectorise under the default -ftrapping-math.
template <typename acc_t>
DMGRD_HOST_DEVICE inline void max_count_update(acc_t& max, int32_t& count, acc_t v, int32_t n) {
  count = v > max ? n : count + (v == max ? n : 0);
  max = v > max ? v : max;
}

// The channel maximum as torch.amax gives it: NaN if a channel is NaN. The running maximum skips NaN, so
// where the channel sum is NaN (a NaN, or +inf and -inf, among the channels) the channels x[c * stride]
// are scanned again.
template <typename scalar_t, typename acc_t>
DMGRD_HOST_DEVICE inline acc_t channel_max(acc_t max, acc_t sum, const scalar_t* x, int64_t stride, int64_t channels) {
  if (sum == sum) return max;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t v = static_cast<acc_t>(x[c * stride]);
    if (v != v) return v;
  }
  return max;
}

inline void check_channel_pool_args(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "dmgrd::channel_pool: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "dmgrd::channel_pool: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "dmgrd::channel_pool: x has no channels");
}

inline void check_channel_pool_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& pooled,
                                             const at::Tensor& ties) {
  check_channel_pool_args(x);
  const std::vector<int64_t> pooled_shape{x.size(0), 2, x.size(2), x.size(3)};
  TORCH_CHECK(grad.sizes() == pooled_shape && pooled.sizes() == pooled_shape,
              "dmgrd::channel_pool_backward: grad and pooled must be ", pooled_shape, ", got ", grad.sizes(), " and ",
              pooled.sizes());
  TORCH_CHECK(ties.sizes() == at::IntArrayRef({x.size(0), x.size(2), x.size(3)}) && ties.scalar_type() == at::kInt,
              "dmgrd::channel_pool_backward: ties must be int32 [B, H, W], got ", ties.scalar_type(), " ",
              ties.sizes());
  for (const at::Tensor* t : {&grad, &pooled, &ties}) {
    TORCH_CHECK(t->device() == x.device(), "dmgrd::channel_pool_backward: all tensors must be on ", x.device());
  }
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && pooled.scalar_type() == x.scalar_type(),
              "dmgrd::channel_pool_backward: grad and pooled must have x's dtype ", x.scalar_type());
}

}  // namespace dmgrd
