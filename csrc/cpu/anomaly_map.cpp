// CPU kernel of dmgrd::anomaly_map: cosine distance per level at the level's resolution, then one fused
// pass per output row (bilinear upsample of every level, combine, horizontal blur) and a vertical blur.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace dmgrd {
namespace {

constexpr int64_t kPixelBlock = 512;

struct Strides {
  int64_t b, c, h, w;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), c(x.stride(1)), h(x.stride(2)), w(x.stride(3)) {}
};

// 1 - cos over channels for pixels [p0, p1) of image b, layout with contiguous (h, w) planes.
template <typename scalar_t, typename acc_t>
void cosine_planar(const scalar_t* t, const scalar_t* s, Strides st, Strides ss, int64_t channels,
                   int64_t p0, int64_t p1, acc_t* out) {
  const int64_t n = p1 - p0;
  std::vector<acc_t> dot(n, acc_t(0)), tt(n, acc_t(0)), sq(n, acc_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* tc = t + c * st.c + p0;
    const scalar_t* sc = s + c * ss.c + p0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = static_cast<acc_t>(tc[i]);
      const acc_t b = static_cast<acc_t>(sc[i]);
      dot[i] += a * b;
      tt[i] += a * a;
      sq[i] += b * b;
    }
  }
  const acc_t eps = static_cast<acc_t>(kCosineEps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = acc_t(1) - dot[i] / (std::max(std::sqrt(tt[i]), eps) * std::max(std::sqrt(sq[i]), eps));
  }
}

// Same for channel-contiguous layouts (channels_last): one pixel at a time, channels innermost.
template <typename scalar_t, typename acc_t>
void cosine_interleaved(const scalar_t* t, const scalar_t* s, Strides st, Strides ss, int64_t channels,
                        int64_t width, int64_t p0, int64_t p1, acc_t* out) {
  const acc_t eps = static_cast<acc_t>(kCosineEps);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t h = p / width, w = p % width;
    const scalar_t* tp = t + h * st.h + w * st.w;
    const scalar_t* sp = s + h * ss.h + w * ss.w;
    acc_t dot(0), tt(0), sq(0);
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t a = static_cast<acc_t>(tp[c]);
      const acc_t b = static_cast<acc_t>(sp[c]);
      dot += a * b;
      tt += a * a;
      sq += b * b;
    }
    out[p - p0] = acc_t(1) - dot / (std::max(std::sqrt(tt), eps) * std::max(std::sqrt(sq), eps));
  }
}

bool planar(const at::Tensor& x) { return x.stride(3) == 1 && x.stride(2) == x.size(3); }
bool interleaved(const at::Tensor& x) { return x.stride(1) == 1; }

// Distance map [B, H*W] of one level, parallel over (image, pixel block).
template <typename scalar_t, typename acc_t>
at::Tensor level_distance(at::Tensor t, at::Tensor s) {
  if (!(planar(t) && planar(s)) && !(interleaved(t) && interleaved(s))) {
    t = t.contiguous();
    s = s.contiguous();
  }
  const bool is_planar = planar(t) && planar(s);
  const int64_t batch = t.size(0), channels = t.size(1), width = t.size(3), pixels = t.size(2) * width;
  at::Tensor dist = at::empty({batch, pixels}, t.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const Strides st(t), ss(s);
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  acc_t* out = dist.mutable_data_ptr<acc_t>();
  const int64_t blocks = (pixels + kPixelBlock - 1) / kPixelBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * kPixelBlock;
      const int64_t p1 = std::min(p0 + kPixelBlock, pixels);
      acc_t* o = out + b * pixels + p0;
      if (is_planar) {
        cosine_planar(tp + b * st.b, sp + b * ss.b, st, ss, channels, p0, p1, o);
      } else {
        cosine_interleaved(tp + b * st.b, sp + b * ss.b, st, ss, channels, width, p0, p1, o);
      }
    }
  });
  return dist;
}

// Bilinear taps of one level along one axis, for every output coordinate. A level already at the output
// size is copied, as ATen does (so a NaN does not leak into its zero-weight neighbour).
template <typename acc_t>
std::vector<LinearTap<acc_t>> axis_taps(int64_t in_size, int64_t out_size, bool copy) {
  const acc_t scale = align_corners_scale<acc_t>(in_size, out_size);
  std::vector<LinearTap<acc_t>> taps(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    taps[i] = copy ? LinearTap<acc_t>{i, i, acc_t(1), acc_t(0)} : linear_tap<acc_t>(scale, i, in_size);
  }
  return taps;
}

template <typename acc_t>
struct Level {
  const acc_t* dist;  // [B, H*W]
  int64_t height, width;
  std::vector<LinearTap<acc_t>> rows, cols;
};

// Combined (upsampled, reduced over levels) values of output row i of image b.
template <typename acc_t>
void combined_row(const std::vector<Level<acc_t>>& levels, Reduce reduce, int64_t b, int64_t i, acc_t* row,
                  int64_t out_w) {
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level<acc_t>& lv = levels[l];
    const LinearTap<acc_t> ry = lv.rows[i];
    const acc_t* r0 = lv.dist + b * lv.height * lv.width + ry.i0 * lv.width;
    const acc_t* r1 = lv.dist + b * lv.height * lv.width + ry.i1 * lv.width;
    for (int64_t j = 0; j < out_w; ++j) {
      const LinearTap<acc_t> cx = lv.cols[j];
      const acc_t v = ry.w0 * (cx.w0 * r0[cx.i0] + cx.w1 * r0[cx.i1]) + ry.w1 * (cx.w0 * r1[cx.i0] + cx.w1 * r1[cx.i1]);
      if (l == 0) {
        row[j] = v;
      } else if (reduce == Reduce::Mul) {
        row[j] *= v;
      } else {
        row[j] += v;
      }
    }
  }
  if (reduce == Reduce::Mean) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(levels.size());
    for (int64_t j = 0; j < out_w; ++j) row[j] *= inv;
  }
}

// out[j] = sum_k taps[k] * in[reflect(j + k - radius)] for a line of n values; `padded` is scratch.
template <typename acc_t>
void blur_line(const acc_t* in, acc_t* out, int64_t n, const std::vector<acc_t>& taps, std::vector<acc_t>& padded) {
  const int64_t radius = (static_cast<int64_t>(taps.size()) - 1) / 2;
  padded.resize(n + 2 * radius);
  for (int64_t j = 0; j < n + 2 * radius; ++j) padded[j] = in[reflect_index(j - radius, n)];
  std::fill(out, out + n, acc_t(0));
  for (size_t k = 0; k < taps.size(); ++k) {
    const acc_t* src = padded.data() + k;
    for (int64_t j = 0; j < n; ++j) out[j] += taps[k] * src[j];
  }
}

template <typename scalar_t>
at::Tensor anomaly_map_typed(const at::TensorList& teacher, const at::TensorList& student, int64_t out_h,
                             int64_t out_w, Reduce reduce, double sigma) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = teacher[0].size(0);
  std::vector<at::Tensor> dists;
  std::vector<Level<acc_t>> levels;
  for (size_t l = 0; l < teacher.size(); ++l) {
    dists.push_back(level_distance<scalar_t, acc_t>(teacher[l], student[l]));
    const int64_t h = teacher[l].size(2), w = teacher[l].size(3);
    const bool copy = h == out_h && w == out_w;
    levels.push_back({dists.back().template const_data_ptr<acc_t>(), h, w, axis_taps<acc_t>(h, out_h, copy),
                      axis_taps<acc_t>(w, out_w, copy)});
  }
  at::Tensor out = at::empty({batch, 1, out_h, out_w}, teacher[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.mutable_data_ptr<acc_t>();
  const int64_t plane = out_h * out_w;
  if (sigma == 0) {
    at::parallel_for(0, batch * out_h, 16, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        combined_row(levels, reduce, task / out_h, task % out_h, o + task * out_w, out_w);
      }
    });
    return out;
  }
  std::vector<acc_t> taps;
  for (double t : gaussian_taps(sigma)) taps.push_back(static_cast<acc_t>(t));
  const int64_t radius = (static_cast<int64_t>(taps.size()) - 1) / 2;
  at::Tensor tmp = at::empty({batch, out_h, out_w}, out.options());
  acc_t* hblur = tmp.mutable_data_ptr<acc_t>();
  at::parallel_for(0, batch * out_h, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(out_w), padded;
    for (int64_t task = begin; task < end; ++task) {
      combined_row(levels, reduce, task / out_h, task % out_h, row.data(), out_w);
      blur_line(row.data(), hblur + task * out_w, out_w, taps, padded);
    }
  });
  at::parallel_for(0, batch * out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / out_h, i = task % out_h;
      acc_t* dst = o + task * out_w;
      std::fill(dst, dst + out_w, acc_t(0));
      for (size_t k = 0; k < taps.size(); ++k) {
        const acc_t* src = hblur + b * plane + reflect_index(i + static_cast<int64_t>(k) - radius, out_h) * out_w;
        for (int64_t j = 0; j < out_w; ++j) dst[j] += taps[k] * src[j];
      }
    }
  });
  return out;
}

at::Tensor anomaly_map_cpu(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                           c10::string_view reduce, double sigma) {
  check_anomaly_map_args(teacher, student, out_size, sigma);
  const Reduce mode = parse_reduce(std::string(reduce));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher[0].scalar_type(), "dmgrd_anomaly_map_cpu", [&] {
    out = anomaly_map_typed<scalar_t>(teacher, student, out_size[0], out_size[1], mode, sigma);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("anomaly_map", &anomaly_map_cpu); }

}  // namespace dmgrd
