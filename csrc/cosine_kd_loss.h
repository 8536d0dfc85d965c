// Shared by the CPU and CUDA kernels of dmgrd::cosine_kd_loss_forward / _backward: argument checks, the
// layout the kernels address, and the per-row cosine term with its gradient coefficients.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"

namespace dmgrd {
namespace kd {

// Term (1 - cos(t, s)) * inv_count of one row from its sums dot = <t, s>, tt = |t|^2, ss = |s|^2, and the
// coefficients of its gradient: dL/ds = c[0] t + c[1] s and dL/dt = c[0] s + c[2] t. The clamped norms are
// treated as constants by the norm's derivative x / |x| (0 at x = 0), exactly as F.cosine_similarity's backward.
template <typename acc_t>
DMGRD_HOST_DEVICE inline acc_t row_term(acc_t dot, acc_t tt, acc_t ss, acc_t inv_count, acc_t* c) {
  const acc_t raw_t = acc_sqrt(tt), raw_s = acc_sqrt(ss);
  const acc_t nt = clamp_norm(raw_t), ns = clamp_norm(raw_s);
  const acc_t cos = dot / (nt * ns);
  c[0] = -inv_count / (nt * ns);
  c[1] = raw_s == acc_t(0) ? acc_t(0) : cos * inv_count / (ns * raw_s);
  c[2] = raw_t == acc_t(0) ? acc_t(0) : cos * inv_count / (nt * raw_t);
  return (acc_t(1) - cos) * inv_count;
}

inline bool parse_pixel(const std::string& reduction) {
  TORCH_CHECK(reduction == "flatten" || reduction == "pixel",
              "dmgrd::cosine_kd_loss: reduction must be flatten or pixel, got ", reduction);
  return reduction == "pixel";
}

inline void check_features(const at::TensorList& teacher, const at::TensorList& student) {
  TORCH_CHECK(!teacher.empty(), "dmgrd::cosine_kd_loss: teacher is empty");
  TORCH_CHECK(teacher.size() == student.size(), "dmgrd::cosine_kd_loss: teacher has ", teacher.size(),
              " levels but student has ", student.size());
  const at::Tensor& first = teacher[0];
  TORCH_CHECK(first.dim() == 4 && first.size(0) > 0, "dmgrd::cosine_kd_loss: features must be [B, C, H, W] with B > 0");
  for (size_t l = 0; l < teacher.size(); ++l) {
    const at::Tensor& t = teacher[l];
    const at::Tensor& s = student[l];
    TORCH_CHECK(t.dim() == 4 && t.sizes() == s.sizes(), "dmgrd::cosine_kd_loss: level ", l, " teacher ", t.sizes(),
                " != student ", s.sizes());
    TORCH_CHECK(t.size(0) == first.size(0) && t.numel() > 0, "dmgrd::cosine_kd_loss: level ", l, " has shape ",
                t.sizes(), ", batch must be ", first.size(0), " and no dimension empty");
    TORCH_CHECK(t.scalar_type() == first.scalar_type() && s.scalar_type() == first.scalar_type(),
                "dmgrd::cosine_kd_loss: all features must share one dtype");
    TORCH_CHECK(t.device() == first.device() && s.device() == first.device(),
                "dmgrd::cosine_kd_loss: all features must be on one device");
    TORCH_CHECK(t.is_floating_point(), "dmgrd::cosine_kd_loss: features must be floating point");
  }
}

inline at::ScalarType acc_dtype(at::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

// Rows of cosine over all levels: one per image (flatten) or per pixel (pixel).
inline int64_t num_rows(const at::TensorList& feats, bool pixel) {
  int64_t rows = 0;
  for (const at::Tensor& f : feats) rows += pixel ? f.size(0) * f.size(2) * f.size(3) : f.size(0);
  return rows;
}

// One level's features in the layout the kernels address from the sizes alone: the student's when it is
// channels_last (so its gradient keeps that layout), else contiguous. Matches dmgrd.ops.cosine_kd_loss.kernel_layout.
struct DenseLevel {
  at::Tensor t, s;
  bool channels_last;
};

inline DenseLevel dense_level(const at::Tensor& t, const at::Tensor& s) {
  const bool channels_last = !s.is_contiguous() && s.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {t.contiguous(format), s.contiguous(format), channels_last};
}

// The gradient of a level's features, in that level's kernel layout.
inline at::Tensor empty_grad(const DenseLevel& level, const at::Tensor& like) {
  const auto format = level.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty(like.sizes(), like.options().memory_format(format));
}

}  // namespace kd
}  // namespace dmgrd
