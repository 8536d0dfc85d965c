// CPU kernels of dmgrd::cosine_kd_loss_forward / _backward (OpenMP through at::parallel_for).
// Forward: each task reduces a piece of a level to per-row sums <t, s>, |t|^2, |s|^2 (a chunk of an image's
// C*H*W vector for flatten, a block of pixels for pixel); the rows' terms and gradient coefficients follow, and
// the terms are added in a fixed order, so the loss does not depend on the thread count.
// Backward: one elementwise pass per level, grad_s = g (a t + b_s s) and, when asked, grad_t = g (a s + b_t t).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "../cosine_kd_loss.h"
#include "huge_pages.h"

namespace dmgrd {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // flatten: elements per task
constexpr int64_t kPixels = 256;              // pixel: pixels per task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
struct Sums {
  acc_t dot = 0, tt = 0, ss = 0;
  void add(const Sums& o) {
    dot += o.dot;
    tt += o.tt;
    ss += o.ss;
  }
};

// <t, s>, |t|^2 and |s|^2 of n consecutive elements (the simd reduction lets the compiler vectorise the sums).
template <typename scalar_t, typename acc_t>
Sums<acc_t> contiguous_sums(const scalar_t* t, const scalar_t* s, int64_t n) {
  acc_t dot = 0, tt = 0, ss = 0;
#pragma omp simd reduction(+ : dot, tt, ss)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = static_cast<acc_t>(t[i]), b = static_cast<acc_t>(s[i]);
    dot += a * b;
    tt += a * a;
    ss += b * b;
  }
  return {dot, tt, ss};
}

// A level as the kernels see it: dense (kd::dense_level), rows of `len` elements or pixels of `channels`.
template <typename scalar_t>
struct Level {
  const scalar_t* t;
  const scalar_t* s;
  int64_t batch, channels, pixels, len;
  bool channels_last;

  explicit Level(const kd::DenseLevel& d)
      : t(d.t.const_data_ptr<scalar_t>()),
        s(d.s.const_data_ptr<scalar_t>()),
        batch(d.t.size(0)),
        channels(d.t.size(1)),
        pixels(d.t.size(2) * d.t.size(3)),
        len(channels * pixels),
        channels_last(d.channels_last) {}

  // Tasks (flatten chunks or pixel blocks) per thread at least: small levels run inline, without a parallel region.
  int64_t grain(bool pixel) const {
    const int64_t task = pixel ? std::min(kPixels, pixels) * channels : std::min(kChunk, len);
    return std::max<int64_t>(1, at::internal::GRAIN_SIZE / task);
  }
};

// Flatten: the level's terms; coeffs gets one row per image.
template <typename scalar_t, typename acc_t>
acc_t flatten_forward(const Level<scalar_t>& lv, acc_t* coeffs) {
  const int64_t chunks = ceil_div(lv.len, kChunk);
  std::vector<Sums<acc_t>> partial(lv.batch * chunks);
  at::parallel_for(0, lv.batch * chunks, lv.grain(false), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t offset = (task / chunks) * lv.len + (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, lv.len - (task % chunks) * kChunk);
      partial[task] = contiguous_sums<scalar_t, acc_t>(lv.t + offset, lv.s + offset, n);
    }
  });
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(lv.batch);
  acc_t total = 0;
  for (int64_t b = 0; b < lv.batch; ++b) {
    Sums<acc_t> row;
    for (int64_t k = 0; k < chunks; ++k) row.add(partial[b * chunks + k]);
    total += kd::row_term(row.dot, row.tt, row.ss, inv_count, coeffs + 3 * b);
  }
  return total;
}

// Pixel: sums of pixels [p0, p0 + n) of image b.
template <typename scalar_t, typename acc_t>
void pixel_sums(const Level<scalar_t>& lv, int64_t b, int64_t p0, int64_t n, Sums<acc_t>* out) {
  const int64_t image = b * lv.len;
  if (lv.channels_last) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t offset = image + (p0 + i) * lv.channels;
      out[i] = contiguous_sums<scalar_t, acc_t>(lv.t + offset, lv.s + offset, lv.channels);
    }
    return;
  }
  acc_t dot[kPixels] = {}, tt[kPixels] = {}, ss[kPixels] = {};
  for (int64_t c = 0; c < lv.channels; ++c) {
    const scalar_t* t = lv.t + image + c * lv.pixels + p0;
    const scalar_t* s = lv.s + image + c * lv.pixels + p0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = static_cast<acc_t>(t[i]), y = static_cast<acc_t>(s[i]);
      dot[i] += x * y;
      tt[i] += x * x;
      ss[i] += y * y;
    }
  }
  for (int64_t i = 0; i < n; ++i) out[i] = {dot[i], tt[i], ss[i]};
}

// Pixel: the level's terms; coeffs gets one row per pixel (b * H * W + h * W + w).
template <typename scalar_t, typename acc_t>
acc_t pixel_forward(const Level<scalar_t>& lv, acc_t* coeffs) {
  const int64_t blocks = ceil_div(lv.pixels, kPixels);
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(lv.batch * lv.pixels);
  std::vector<acc_t> partial(lv.batch * blocks);
  at::parallel_for(0, lv.batch * blocks, lv.grain(true), [&](int64_t begin, int64_t end) {
    std::vector<Sums<acc_t>> sums(kPixels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * kPixels;
      const int64_t n = std::min(kPixels, lv.pixels - p0);
      pixel_sums<scalar_t, acc_t>(lv, b, p0, n, sums.data());
      acc_t total = 0;
      for (int64_t i = 0; i < n; ++i) {
        const Sums<acc_t>& r = sums[i];
        total += kd::row_term(r.dot, r.tt, r.ss, inv_count, coeffs + 3 * (b * lv.pixels + p0 + i));
      }
      partial[task] = total;
    }
  });
  acc_t total = 0;
  for (const acc_t p : partial) total += p;
  return total;
}

std::tuple<at::Tensor, at::Tensor> cosine_kd_loss_forward_cpu(at::TensorList teacher, at::TensorList student,
                                                              c10::string_view reduction) {
  kd::check_features(teacher, student);
  const bool pixel = kd::parse_pixel(std::string(reduction));
  const auto options = teacher[0].options().dtype(kd::acc_dtype(teacher[0].scalar_type()));
  at::Tensor coeffs = at::empty({kd::num_rows(teacher, pixel), 3}, options);
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher[0].scalar_type(), "dmgrd_cosine_kd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* c = coeffs.mutable_data_ptr<acc_t>();
    acc_t total = 0;
    for (size_t l = 0; l < teacher.size(); ++l) {
      const kd::DenseLevel dense = kd::dense_level(teacher[l], student[l]);
      const Level<scalar_t> lv(dense);
      total += pixel ? pixel_forward<scalar_t, acc_t>(lv, c) : flatten_forward<scalar_t, acc_t>(lv, c);
      c += 3 * (pixel ? lv.batch * lv.pixels : lv.batch);
    }
    loss.fill_(total);
  });
  return {loss, coeffs};
}

// gs = a t + b_s s (and gt = a s + b_t t when gt is given) over n consecutive elements; c = g * coefficients.
template <typename scalar_t, typename acc_t>
void grad_row(const scalar_t* t, const scalar_t* s, scalar_t* gs, scalar_t* gt, int64_t n, const acc_t* c) {
  for (int64_t i = 0; i < n; ++i) {
    gs[i] = static_cast<scalar_t>(c[0] * static_cast<acc_t>(t[i]) + c[1] * static_cast<acc_t>(s[i]));
  }
  if (gt == nullptr) return;
  for (int64_t i = 0; i < n; ++i) {
    gt[i] = static_cast<scalar_t>(c[0] * static_cast<acc_t>(s[i]) + c[2] * static_cast<acc_t>(t[i]));
  }
}

// Pixel, contiguous layout: pixels [p0, p0 + n) of image b, every channel; c = scaled coefficients of the pixels.
template <typename scalar_t, typename acc_t>
void grad_planar(const Level<scalar_t>& lv, int64_t b, int64_t p0, int64_t n, const acc_t* c, scalar_t* gs,
                 scalar_t* gt) {
  acc_t a[kPixels], bs[kPixels], bt[kPixels];
  for (int64_t i = 0; i < n; ++i) {
    a[i] = c[3 * i];
    bs[i] = c[3 * i + 1];
    bt[i] = c[3 * i + 2];
  }
  for (int64_t ch = 0; ch < lv.channels; ++ch) {
    const int64_t offset = b * lv.len + ch * lv.pixels + p0;
    const scalar_t* t = lv.t + offset;
    const scalar_t* s = lv.s + offset;
    for (int64_t i = 0; i < n; ++i) {
      gs[offset + i] = static_cast<scalar_t>(a[i] * static_cast<acc_t>(t[i]) + bs[i] * static_cast<acc_t>(s[i]));
    }
    if (gt == nullptr) continue;
    for (int64_t i = 0; i < n; ++i) {
      gt[offset + i] = static_cast<scalar_t>(a[i] * static_cast<acc_t>(s[i]) + bt[i] * static_cast<acc_t>(t[i]));
    }
  }
}

// One level's gradients; c = g * the level's coefficients, three per row.
template <typename scalar_t, typename acc_t>
void level_backward(const Level<scalar_t>& lv, bool pixel, const acc_t* c, scalar_t* gs, scalar_t* gt) {
  const int64_t per_image = pixel ? ceil_div(lv.pixels, kPixels) : ceil_div(lv.len, kChunk);
  at::parallel_for(0, lv.batch * per_image, lv.grain(pixel), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_image, piece = task % per_image;
      if (!pixel) {
        const int64_t k0 = piece * kChunk, offset = b * lv.len + k0;
        grad_row(lv.t + offset, lv.s + offset, gs + offset, gt ? gt + offset : nullptr,
                 std::min(kChunk, lv.len - k0), c + 3 * b);
        continue;
      }
      const int64_t p0 = piece * kPixels, n = std::min(kPixels, lv.pixels - p0);
      const acc_t* pc = c + 3 * (b * lv.pixels + p0);
      if (!lv.channels_last) {
        grad_planar(lv, b, p0, n, pc, gs, gt);
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t offset = b * lv.len + (p0 + i) * lv.channels;
        grad_row(lv.t + offset, lv.s + offset, gs + offset, gt ? gt + offset : nullptr, lv.channels, pc + 3 * i);
      }
    }
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cosine_kd_loss_backward_cpu(
    const at::Tensor& grad, at::TensorList teacher, at::TensorList student, const at::Tensor& coeffs,
    c10::string_view reduction, bool teacher_grad) {
  kd::check_features(teacher, student);
  const bool pixel = kd::parse_pixel(std::string(reduction));
  const at::ScalarType acc = kd::acc_dtype(teacher[0].scalar_type());
  TORCH_CHECK(coeffs.scalar_type() == acc && coeffs.is_contiguous() &&
                  coeffs.numel() == 3 * kd::num_rows(teacher, pixel),
              "dmgrd::cosine_kd_loss_backward: coeffs must be the forward pass's contiguous [rows, 3] ", acc,
              " tensor");
  std::vector<at::Tensor> grads_s, grads_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher[0].scalar_type(), "dmgrd_cosine_kd_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // g folded into the coefficients once: [rows, 3] scaled
    const at::Tensor scaled = coeffs * grad.to(acc);
    const acc_t* c = scaled.const_data_ptr<acc_t>();
    for (size_t l = 0; l < teacher.size(); ++l) {
      const kd::DenseLevel dense = kd::dense_level(teacher[l], student[l]);
      const Level<scalar_t> lv(dense);
      grads_s.push_back(with_huge_pages(kd::empty_grad(dense, student[l])));
      if (teacher_grad) grads_t.push_back(with_huge_pages(kd::empty_grad(dense, teacher[l])));
      scalar_t* gt = teacher_grad ? grads_t.back().mutable_data_ptr<scalar_t>() : nullptr;
      level_backward<scalar_t, acc_t>(lv, pixel, c, grads_s.back().mutable_data_ptr<scalar_t>(), gt);
      c += 3 * (pixel ? lv.batch * lv.pixels : lv.batch);
    }
  });
  return {grads_s, grads_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) {
  m.impl("cosine_kd_loss_forward", &cosine_kd_loss_forward_cpu);
  m.impl("cosine_kd_loss_backward", &cosine_kd_loss_backward_cpu);
}

}  // namespace dmgrd
