// CPU kernels of dmgrd::channel_pool, forward and backward, one pass over the input pixel block by pixel block
// (pixel_blocks.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../channel_pool.h"
#include "pixel_blocks.h"

namespace dmgrd {
namespace {

using pixel_blocks::Dense;
using pixel_blocks::for_each_element;
using pixel_blocks::parallel_blocks;

// Channel max, its tie count and channel mean of pixels [p0, p1) of image b, into pooled [B, 2, H*W] and
// ties [B, H*W].
template <typename scalar_t>
DMGRD_CPU_CLONES void channel_pool_block(const Dense& x, int64_t b, int64_t p0, int64_t p1, scalar_t* pooled,
                                         int32_t* ties) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = p1 - p0, pixels = x.pixels;
  std::vector<acc_t> max(n, -std::numeric_limits<acc_t>::infinity()), sum(n, acc_t(0));
  std::vector<int32_t> count(n, 0);
  acc_t* mx = max.data();
  acc_t* total = sum.data();
  int32_t* cnt = count.data();
  const scalar_t* image = x.t.const_data_ptr<scalar_t>() + b * x.image();
  for_each_element(x, p0, p1, [&](int64_t i, int64_t offset) {
    const acc_t v = static_cast<acc_t>(image[offset]);
    max_count_update(mx[i], cnt[i], v, 1);
    total[i] += v;
  });
  const acc_t channels = static_cast<acc_t>(x.channels);
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* pixel = image + x.pixel_offset(p0 + i);
    const acc_t m = channel_max(mx[i], total[i], pixel, x.channel_stride(), x.channels);
    pooled[(2 * b) * pixels + p0 + i] = static_cast<scalar_t>(m);
    pooled[(2 * b + 1) * pixels + p0 + i] = static_cast<scalar_t>(total[i] / channels);
    ties[b * pixels + p0 + i] = cnt[i];
  }
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cpu(const at::Tensor& x_in) {
  check_channel_pool_args(x_in);
  const Dense x(x_in);
  at::Tensor pooled = at::empty({x.batch, 2, x_in.size(2), x_in.size(3)}, x_in.options());
  at::Tensor ties = at::empty({x.batch, x_in.size(2), x_in.size(3)}, x_in.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "dmgrd_channel_pool_cpu", [&] {
    scalar_t* out = pooled.mutable_data_ptr<scalar_t>();
    int32_t* tie = ties.mutable_data_ptr<int32_t>();
    parallel_blocks(x, [&](int64_t b, int64_t p0, int64_t p1) { channel_pool_block(x, b, p0, p1, out, tie); });
  });
  return {pooled, ties};
}

// grad_x = (x == max) * grad_max / ties + grad_mean / C for pixels [p0, p1) of image b (grad and pooled are
// [B, 2, H*W], ties [B, H*W]).
template <typename scalar_t>
DMGRD_CPU_CLONES void channel_pool_backward_block(const Dense& x, int64_t b, int64_t p0, int64_t p1,
                                                  const scalar_t* grad, const scalar_t* pooled, const int32_t* ties,
                                                  scalar_t* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = p1 - p0, pixels = x.pixels;
  const acc_t channels = static_cast<acc_t>(x.channels);
  std::vector<acc_t> max(n), share(n), mean_share(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at_max = (2 * b) * pixels + p0 + i;
    max[i] = static_cast<acc_t>(pooled[at_max]);
    share[i] = static_cast<acc_t>(grad[at_max]) / static_cast<acc_t>(ties[b * pixels + p0 + i]);
    mean_share[i] = static_cast<acc_t>(grad[at_max + pixels]) / channels;
  }
  const acc_t* mx = max.data();
  const acc_t* sh = share.data();
  const acc_t* msh = mean_share.data();
  const scalar_t* image = x.t.const_data_ptr<scalar_t>() + b * x.image();
  scalar_t* grad_image = grad_x + b * x.image();
  for_each_element(x, p0, p1, [&](int64_t i, int64_t offset) {
    const acc_t hit = static_cast<acc_t>(image[offset]) == mx[i] ? acc_t(1) : acc_t(0);
    grad_image[offset] = static_cast<scalar_t>(hit * sh[i] + msh[i]);
  });
}

at::Tensor channel_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& pooled,
                                     const at::Tensor& ties) {
  check_channel_pool_backward_args(grad, x_in, pooled, ties);
  const Dense x(x_in);
  at::Tensor grad_x = x.empty();
  const at::Tensor g = grad.contiguous(), pool = pooled.contiguous(), tie = ties.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "dmgrd_channel_pool_backward_cpu", [&] {
    const scalar_t* g_in = g.const_data_ptr<scalar_t>();
    const scalar_t* pool_in = pool.const_data_ptr<scalar_t>();
    const int32_t* tie_in = tie.const_data_ptr<int32_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    parallel_blocks(x, [&](int64_t b, int64_t p0, int64_t p1) {
      channel_pool_backward_block(x, b, p0, p1, g_in, pool_in, tie_in, out);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) {
  m.impl("channel_pool", &channel_pool_cpu);
  m.impl("channel_pool_backward", &channel_pool_backward_cpu);
}

}  // namespace dmgrd
