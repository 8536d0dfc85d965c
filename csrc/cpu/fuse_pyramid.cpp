// CPU kernels of dmgrd::channel_pool and dmgrd::fuse_pyramid, forward and backward. The passes over the big
// [B, C, H, W] tensors walk each image in blocks of pixels in memory order (channel-major for contiguous
// tensors, pixel-major for channels_last), so each is read or written once; the small per-pixel maps
// (masks, mask gradients) are float32 (float64 for float64 inputs), [B, H*W] contiguous.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../fuse_pyramid.h"

namespace dmgrd {
namespace {

constexpr int64_t kMinPixelBlock = 256;
constexpr int64_t kMaxPixelBlock = 4096;     // long contiguous rows stream best
constexpr int64_t kGroupRow = 2048;          // shorter rows are read one channel at a time
constexpr int64_t kMinTaskElements = 32768;  // smaller inputs run on the calling thread

// at::parallel_for grain for iterations of `elements` elements each.
int64_t grain(int64_t elements) { return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(elements, 1)); }

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
  // Offset of channel c of pixel p in one image, and between channels.
  int64_t offset(int64_t c, int64_t p) const { return channels_last ? p * channels + c : c * pixels + p; }
  int64_t channel_stride() const { return channels_last ? 1 : pixels; }
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  at::Tensor empty() const { return dense_like(t); }
};

template <int U, typename Body>
void call(const Body& body, int64_t i, int64_t offset, int64_t stride) {
  body.template operator()<U>(i, offset, stride);
}

// Visits every channel of every pixel p0 + i of [p0, p1) of one image, in memory order: body<U>(i, offset,
// stride) handles channels c .. c + U - 1 of the pixel, at element offsets offset + u * stride. Contiguous
// images go channel by channel, or Group channels at a time when rows of the block are long enough for
// Group read streams (reductions take Group = 4: their per-pixel accumulators then move once per 4
// channels; loops that write the big tensors keep Group = 1, as strided store groups defeat the
// vectoriser's alias checks); channels_last images go element by element.
template <int Group, typename Body>
void for_each_element(const Dense& d, int64_t p0, int64_t p1, const Body& body) {
  if (d.channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < d.channels; ++c) call<1>(body, p - p0, p * d.channels + c, 1);
    }
    return;
  }
  int64_t c = 0;
  for (; Group > 1 && p1 - p0 >= kGroupRow && c + Group <= d.channels; c += Group) {
    for (int64_t p = p0; p < p1; ++p) call<Group>(body, p - p0, c * d.pixels + p, d.pixels);
  }
  for (; c < d.channels; ++c) {
    for (int64_t p = p0; p < p1; ++p) call<1>(body, p - p0, c * d.pixels + p, d.pixels);
  }
}

// Pixels per task: up to kMaxPixelBlock, fewer when whole images would leave threads idle.
int64_t pixel_block(const Dense& d) {
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

template <typename scalar_t>
void channel_pool_typed(const Dense& x, at::Tensor& pooled, at::Tensor& ties) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = x.t.const_data_ptr<scalar_t>();
  scalar_t* out = pooled.mutable_data_ptr<scalar_t>();
  int32_t* tie = ties.mutable_data_ptr<int32_t>();
  const int64_t pixels = x.pixels;
  parallel_blocks(x, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t n = p1 - p0;
    std::vector<acc_t> max(n, -std::numeric_limits<acc_t>::infinity()), sum(n, acc_t(0));
    std::vector<int32_t> count(n, 0);
    acc_t* mx = max.data();
    acc_t* total = sum.data();
    int32_t* cnt = count.data();
    const scalar_t* image = in + b * x.image();
    for_each_element<4>(x, p0, p1, [&]<int U>(int64_t i, int64_t offset, int64_t stride) {
      acc_t m = mx[i], t = total[i];
      int32_t k = cnt[i];
      for (int u = 0; u < U; ++u) {
        const acc_t v = static_cast<acc_t>(image[offset + u * stride]);
        max_count_update(m, k, v, 1);
        t += v;
      }
      mx[i] = m;
      total[i] = t;
      cnt[i] = k;
    });
    const acc_t channels = static_cast<acc_t>(x.channels);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* pixel = image + x.offset(0, p0 + i);
      const acc_t m = channel_max(mx[i], total[i], pixel, x.channel_stride(), x.channels);
      out[(2 * b) * pixels + p0 + i] = static_cast<scalar_t>(m);
      out[(2 * b + 1) * pixels + p0 + i] = static_cast<scalar_t>(total[i] / channels);
      tie[b * pixels + p0 + i] = cnt[i];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cpu(const at::Tensor& x_in) {
  check_channel_pool_args(x_in);
  const Dense x(x_in);
  at::Tensor pooled = at::empty({x.batch, 2, x_in.size(2), x_in.size(3)}, x_in.options());
  at::Tensor ties = at::empty({x.batch, x_in.size(2), x_in.size(3)}, x_in.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "dmgrd_channel_pool_cpu",
                                  [&] { channel_pool_typed<scalar_t>(x, pooled, ties); });
  return {pooled, ties};
}

// grad_x = (x == max) * grad_max / ties + grad_mean / C, per channel.
template <typename scalar_t>
void channel_pool_backward_typed(const at::Tensor& grad, const Dense& x, const at::Tensor& pooled,
                                 const at::Tensor& ties, at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* pool = pooled.const_data_ptr<scalar_t>();
  const int32_t* tie = ties.const_data_ptr<int32_t>();
  const scalar_t* in = x.t.const_data_ptr<scalar_t>();
  scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t pixels = x.pixels;
  const acc_t channels = static_cast<acc_t>(x.channels);
  parallel_blocks(x, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t n = p1 - p0;
    std::vector<acc_t> max(n), share(n), mean_share(n);
    for (int64_t i = 0; i < n; ++i) {
      max[i] = static_cast<acc_t>(pool[(2 * b) * pixels + p0 + i]);
      share[i] = static_cast<acc_t>(g[(2 * b) * pixels + p0 + i]) / static_cast<acc_t>(tie[b * pixels + p0 + i]);
      mean_share[i] = static_cast<acc_t>(g[(2 * b + 1) * pixels + p0 + i]) / channels;
    }
    const acc_t* mx = max.data();
    const acc_t* sh = share.data();
    const acc_t* msh = mean_share.data();
    const scalar_t* image = in + b * x.image();
    scalar_t* grad_image = out + b * x.image();
    for_each_element<1>(x, p0, p1, [&]<int U>(int64_t i, int64_t offset, int64_t stride) {
      for (int u = 0; u < U; ++u) {
        const int64_t o = offset + u * stride;
        const acc_t hit = static_cast<acc_t>(image[o]) == mx[i] ? acc_t(1) : acc_t(0);
        grad_image[o] = static_cast<scalar_t>(hit * sh[i] + msh[i]);
      }
    });
  });
}

at::Tensor channel_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& pooled,
                                     const at::Tensor& ties) {
  check_channel_pool_backward_args(grad, x_in, pooled, ties);
  const Dense x(x_in);
  at::Tensor grad_x = x.empty();
  const at::Tensor g = grad.contiguous(), pool = pooled.contiguous(), tie = ties.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "dmgrd_channel_pool_backward_cpu",
                                  [&] { channel_pool_backward_typed<scalar_t>(g, x, pool, tie, grad_x); });
  return grad_x;
}

template <typename acc_t>
Upsample<acc_t> level_upsample(const at::TensorList& logits, size_t l) {
  if (l + 1 == logits.size()) return {};
  return Upsample<acc_t>::make(logits[l + 1].size(2), logits[l + 1].size(3), logits[l].size(2), logits[l].size(3));
}

// The attention masks [B, H_l * W_l] of every level, computed coarse to fine.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> attention_masks(const at::TensorList& logits) {
  const size_t levels = logits.size();
  std::vector<at::Tensor> masks(levels);
  for (size_t l = levels; l-- > 0;) {
    const at::Tensor a = logits[l].contiguous();
    const int64_t batch = a.size(0), height = a.size(2), width = a.size(3);
    masks[l] = at::empty({batch, height * width}, a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const Upsample<acc_t> up = level_upsample<acc_t>(logits, l);
    const acc_t* coarse = l + 1 < levels ? masks[l + 1].template const_data_ptr<acc_t>() : nullptr;
    const int64_t coarse_plane = up.in_h * up.in_w;
    const scalar_t* in = a.const_data_ptr<scalar_t>();
    acc_t* out = masks[l].template mutable_data_ptr<acc_t>();
    at::parallel_for(0, batch * height, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / height, y = row % height;
        const acc_t* plane = coarse == nullptr ? nullptr : coarse + b * coarse_plane;
        for (int64_t x = 0; x < width; ++x) {
          out[row * width + x] = mask_at(static_cast<acc_t>(in[row * width + x]), plane, up, y, x);
        }
      }
    });
  }
  return masks;
}

template <typename scalar_t>
std::vector<at::Tensor> fuse_pyramid_typed(const at::TensorList& features, const at::TensorList& logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<at::Tensor> masks = attention_masks<scalar_t, acc_t>(logits);
  std::vector<at::Tensor> outputs;
  for (size_t l = 0; l < features.size(); ++l) {
    const Dense f(features[l]);
    at::Tensor out = f.empty();
    const scalar_t* in = f.t.const_data_ptr<scalar_t>();
    const acc_t* mask = masks[l].const_data_ptr<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    parallel_blocks(f, [&](int64_t b, int64_t p0, int64_t p1) {
      const acc_t* m = mask + b * f.pixels + p0;
      const scalar_t* image = in + b * f.image();
      scalar_t* out_image = o + b * f.image();
      for_each_element<1>(f, p0, p1, [&]<int U>(int64_t i, int64_t offset, int64_t stride) {
        for (int u = 0; u < U; ++u) {
          const int64_t o = offset + u * stride;
          out_image[o] = static_cast<scalar_t>(static_cast<acc_t>(image[o]) * m[i]);
        }
      });
    });
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

// grad_f = grad * mask per element, and the mask's gradient sum_c grad * f per pixel ([B, H*W]).
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> gate_backward(const at::Tensor& grad, const Dense& f, const at::Tensor& mask) {
  const at::Tensor g = grad.contiguous(f.format());
  at::Tensor grad_f = f.empty();
  at::Tensor grad_mask = at::empty_like(mask);
  const scalar_t* gin = g.const_data_ptr<scalar_t>();
  const scalar_t* fin = f.t.const_data_ptr<scalar_t>();
  const acc_t* m_all = mask.const_data_ptr<acc_t>();
  scalar_t* gf = grad_f.mutable_data_ptr<scalar_t>();
  acc_t* gm = grad_mask.mutable_data_ptr<acc_t>();
  parallel_blocks(f, [&](int64_t b, int64_t p0, int64_t p1) {
    std::vector<acc_t> dot(p1 - p0, acc_t(0));
    acc_t* d = dot.data();
    const acc_t* m = m_all + b * f.pixels + p0;
    const scalar_t* g_image = gin + b * f.image();
    const scalar_t* f_image = fin + b * f.image();
    scalar_t* gf_image = gf + b * f.image();
    for_each_element<1>(f, p0, p1, [&]<int U>(int64_t i, int64_t offset, int64_t stride) {
      acc_t sum = d[i];
      for (int u = 0; u < U; ++u) {
        const int64_t o = offset + u * stride;
        const acc_t gv = static_cast<acc_t>(g_image[o]);
        gf_image[o] = static_cast<scalar_t>(gv * m[i]);
        sum += gv * static_cast<acc_t>(f_image[o]);
      }
      d[i] = sum;
    });
    std::copy(dot.begin(), dot.end(), gm + b * f.pixels + p0);
  });
  return {grad_f, grad_mask};
}

// Gradients of the logits, fine to coarse: each level adds its share of the gradient of up(coarser mask)
// into the coarser level's mask gradient before that level is processed. Parallel over images.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> logits_backward(const at::TensorList& logits, const std::vector<at::Tensor>& masks,
                                        std::vector<at::Tensor>& grad_masks) {
  const size_t levels = logits.size();
  std::vector<at::Tensor> grad_logits;
  for (size_t l = 0; l < levels; ++l) {
    const at::Tensor a = logits[l].contiguous();
    at::Tensor grad_a = at::empty(a.sizes(), a.options());
    const int64_t batch = a.size(0), width = a.size(3), pixels = a.size(2) * width;
    const Upsample<acc_t> up = level_upsample<acc_t>(logits, l);
    const bool coarsest = l + 1 == levels;
    const int64_t coarse_plane = up.in_h * up.in_w;
    const scalar_t* in = a.const_data_ptr<scalar_t>();
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
          const acc_t ga = mask_backward_at(static_cast<acc_t>(in[p]), gm[p], plane, grad_plane, up, y, x,
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
  const std::vector<at::Tensor> masks = attention_masks<scalar_t, acc_t>(logits);
  std::vector<at::Tensor> grad_features, grad_masks;
  for (size_t l = 0; l < features.size(); ++l) {
    auto [grad_f, grad_mask] = gate_backward<scalar_t, acc_t>(grads[l], Dense(features[l]), masks[l]);
    grad_features.push_back(grad_f);
    grad_masks.push_back(grad_mask);
  }
  return {grad_features, logits_backward<scalar_t, acc_t>(logits, masks, grad_masks)};
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
  m.impl("channel_pool", &channel_pool_cpu);
  m.impl("channel_pool_backward", &channel_pool_backward_cpu);
  m.impl("fuse_pyramid", &fuse_pyramid_cpu);
  m.impl("fuse_pyramid_backward", &fuse_pyramid_backward_cpu);
}

}  // namespace dmgrd
