// Helpers shared by the CPU and CUDA kernels: argument checks, the Gaussian / bilinear / reflection
// arithmetic of dmgrd.ops.anomaly_map (matching its torch reference operation for operation), and the
// bank-side pieces of dmgrd.ops.memory_readout.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#ifdef __CUDACC__
#define DMGRD_HOST_DEVICE __host__ __device__
#else
#define DMGRD_HOST_DEVICE
#endif

namespace dmgrd {

constexpr double kCosineEps = 1e-8;
constexpr double kNormEps = 1e-12;  // F.normalize's clamp of the norm

DMGRD_HOST_DEVICE inline float acc_sqrt(float x) { return sqrtf(x); }
DMGRD_HOST_DEVICE inline double acc_sqrt(double x) { return sqrt(x); }

// torch's clamp_min of a norm (NaN stays NaN): F.cosine_similarity clamps at kCosineEps, F.normalize at kNormEps.
template <typename acc_t>
DMGRD_HOST_DEVICE inline acc_t clamp_norm(acc_t norm, double eps = kCosineEps) {
  const acc_t floor = static_cast<acc_t>(eps);
  return norm < floor ? floor : norm;
}

enum class Reduce : int { Sum = 0, Mean = 1, Mul = 2 };

inline Reduce parse_reduce(const std::string& reduce) {
  if (reduce == "sum") return Reduce::Sum;
  if (reduce == "mean") return Reduce::Mean;
  TORCH_CHECK(reduce == "mul", "dmgrd::anomaly_map: reduce must be sum, mean or mul, got ", reduce);
  return Reduce::Mul;
}

// Normalised taps of scipy.ndimage.gaussian_filter (truncate 4): 2 * int(4 sigma + 0.5) + 1 values.
inline std::vector<double> gaussian_taps(double sigma) {
  const int64_t radius = static_cast<int64_t>(4.0 * sigma + 0.5);
  std::vector<double> taps(2 * radius + 1);
  double total = 0.0;
  for (int64_t i = -radius; i <= radius; ++i) {
    const double x = static_cast<double>(i) / sigma;
    taps[i + radius] = std::exp(-0.5 * x * x);
    total += taps[i + radius];
  }
  for (double& t : taps) t /= total;
  return taps;
}

// scipy mode "reflect" (half-sample symmetric), repeated for indices any distance outside [0, size).
DMGRD_HOST_DEVICE inline int64_t reflect_index(int64_t i, int64_t size) {
  const int64_t period = 2 * size;
  int64_t m = i % period;
  if (m < 0) m += period;
  return m >= size ? period - 1 - m : m;
}

// Bilinear source position for align_corners=True, as ATen's upsample_bilinear2d computes it.
template <typename acc_t>
struct LinearTap {
  int64_t i0, i1;
  acc_t w0, w1;
};

template <typename acc_t>
DMGRD_HOST_DEVICE inline acc_t align_corners_scale(int64_t in_size, int64_t out_size) {
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
}

template <typename acc_t>
DMGRD_HOST_DEVICE inline LinearTap<acc_t> linear_tap(acc_t scale, int64_t dst, int64_t in_size) {
  const acc_t src = scale * static_cast<acc_t>(dst);
  const int64_t i0 = static_cast<int64_t>(src);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const acc_t w1 = src - static_cast<acc_t>(i0);
  return {i0, i1, acc_t(1) - w1, w1};
}

inline void check_anomaly_map_args(const at::TensorList& teacher, const at::TensorList& student,
                                   at::IntArrayRef out_size, double sigma) {
  TORCH_CHECK(!teacher.empty(), "dmgrd::anomaly_map: teacher is empty");
  TORCH_CHECK(teacher.size() == student.size(), "dmgrd::anomaly_map: teacher has ", teacher.size(),
              " levels but student has ", student.size());
  TORCH_CHECK(out_size.size() == 2 && out_size[0] > 0 && out_size[1] > 0,
              "dmgrd::anomaly_map: out_size must be two positive ints");
  TORCH_CHECK(sigma >= 0 && std::isfinite(sigma), "dmgrd::anomaly_map: sigma must be finite and >= 0");
  const auto batch = teacher[0].size(0);
  for (size_t l = 0; l < teacher.size(); ++l) {
    const auto& t = teacher[l];
    const auto& s = student[l];
    TORCH_CHECK(t.dim() == 4 && s.dim() == 4, "dmgrd::anomaly_map: level ", l, " must be 4-D");
    TORCH_CHECK(t.sizes() == s.sizes(), "dmgrd::anomaly_map: level ", l, " teacher ", t.sizes(),
                " != student ", s.sizes());
    TORCH_CHECK(t.scalar_type() == s.scalar_type() && t.scalar_type() == teacher[0].scalar_type(),
                "dmgrd::anomaly_map: all levels must share one dtype");
    TORCH_CHECK(t.device() == teacher[0].device() && s.device() == teacher[0].device(),
                "dmgrd::anomaly_map: all levels must be on one device");
    TORCH_CHECK(t.size(0) == batch, "dmgrd::anomaly_map: level ", l, " batch ", t.size(0), " != ", batch);
    TORCH_CHECK(t.is_floating_point(), "dmgrd::anomaly_map: features must be floating point");
  }
}

inline at::ScalarType anomaly_map_out_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_image_score_args(const at::Tensor& map, const std::string& mode, int64_t k) {
  TORCH_CHECK(map.dim() == 3, "dmgrd::image_score: anomaly_map must be [B, H, W], got ", map.sizes());
  TORCH_CHECK(map.is_floating_point(), "dmgrd::image_score: anomaly_map must be floating point");
  TORCH_CHECK(mode == "max" || mode == "topk_mean", "dmgrd::image_score: mode must be max or topk_mean");
  TORCH_CHECK(mode == "max" || (k >= 1 && k <= map.size(1) * map.size(2)),
              "dmgrd::image_score: k must be in [1, H*W], got ", k);
}

// float32 accumulation for every floating dtype but float64.
inline at::ScalarType accumulation_dtype(at::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

// Greedy k-center order of distances: NaN is the largest value; equal values are not farther (the caller
// keeps the lower index, as torch.argmax does).
template <typename acc_t>
DMGRD_HOST_DEVICE inline bool farther(acc_t a, acc_t b) {
  return (a != a) ? (b == b) : a > b;
}

inline void check_coreset_update_args(const at::Tensor& points, const at::Tensor& center, const at::Tensor& min_dist) {
  TORCH_CHECK(points.dim() == 2 && points.size(0) > 0, "dmgrd::coreset_update: points must be [N, D] with N > 0, got ",
              points.sizes());
  TORCH_CHECK(points.is_floating_point(), "dmgrd::coreset_update: points must be floating point");
  TORCH_CHECK(center.dim() == 1 && center.size(0) == points.size(1), "dmgrd::coreset_update: center must be [D], got ",
              center.sizes());
  TORCH_CHECK(min_dist.dim() == 1 && min_dist.size(0) == points.size(0),
              "dmgrd::coreset_update: min_dist must be [N], got ", min_dist.sizes());
  TORCH_CHECK(center.scalar_type() == points.scalar_type(),
              "dmgrd::coreset_update: center must share the points' dtype");
  const auto acc = accumulation_dtype(points.scalar_type());
  TORCH_CHECK(min_dist.scalar_type() == acc, "dmgrd::coreset_update: min_dist must be ", acc, " for ",
              points.scalar_type(), " points");
  TORCH_CHECK(center.device() == points.device() && min_dist.device() == points.device(),
              "dmgrd::coreset_update: points, center and min_dist must be on one device");
}

inline void check_memory_readout_args(const at::Tensor& query, const at::Tensor& bank, double temperature) {
  TORCH_CHECK(query.dim() == 2 && bank.dim() == 2, "dmgrd::memory_readout: query and bank must be 2-D, got ",
              query.sizes(), " and ", bank.sizes());
  TORCH_CHECK(query.size(1) == bank.size(1), "dmgrd::memory_readout: query and bank must have the same D, got ",
              query.size(1), " and ", bank.size(1));
  TORCH_CHECK(bank.size(0) > 0, "dmgrd::memory_readout: bank has no memory items");
  TORCH_CHECK(query.scalar_type() == bank.scalar_type() && query.device() == bank.device(),
              "dmgrd::memory_readout: query and bank must share dtype and device");
  TORCH_CHECK(query.is_floating_point(), "dmgrd::memory_readout: inputs must be floating point");
  TORCH_CHECK(temperature > 0, "dmgrd::memory_readout: temperature must be > 0, got ", temperature);
}

inline void check_memory_readout_backward_args(const at::Tensor& grad_out, const at::Tensor& query,
                                               const at::Tensor& bank, const at::Tensor& out, const at::Tensor& lse,
                                               const at::Tensor& query_norm, double temperature) {
  check_memory_readout_args(query, bank, temperature);
  TORCH_CHECK(grad_out.sizes() == query.sizes() && out.sizes() == query.sizes(),
              "dmgrd::memory_readout_backward: grad_out and out must have the query's shape ", query.sizes());
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "dmgrd::memory_readout_backward: grad_out and out must have the query's dtype");
  const auto acc = accumulation_dtype(query.scalar_type());
  for (const at::Tensor* row : {&lse, &query_norm}) {
    TORCH_CHECK(row->dim() == 1 && row->size(0) == query.size(0) && row->scalar_type() == acc,
                "dmgrd::memory_readout_backward: lse and query_norm must be [N] in ", acc);
  }
}

// Per memory item: 1 / max(|m|, eps) and the weight of the norm's own gradient, 1 / |m|^2 where the norm is
// not clamped and 0 where it is (as F.normalize's clamp_min passes no gradient there).
struct InverseNorms {
  at::Tensor inverse, grad_weight;
};

inline at::Tensor norm_grad_weight(const at::Tensor& norm) {
  return norm.clamp_min(kNormEps).reciprocal().square_().mul_(norm.ge(kNormEps));
}

inline InverseNorms inverse_norms(const at::Tensor& rows) {
  const at::Tensor norm = rows.square().sum(1).sqrt();
  return {norm.clamp_min(kNormEps).reciprocal(), norm_grad_weight(norm)};
}

// grad_bank = (partial read-out and key gradients summed) - m * (sum_i dS_ij s_ij) * grad_weight_j.
inline at::Tensor finish_bank_grad(const at::Tensor& partial, const at::Tensor& score_grad_sum,
                                   const at::Tensor& bank_acc, const InverseNorms& norms, at::ScalarType dtype) {
  return (partial - bank_acc * (score_grad_sum * norms.grad_weight).unsqueeze(1)).to(dtype);
}

// ---- the fast kernels' output layout ----

// The layout of the outputs for input x: channels_last if x is channels_last-contiguous only, else contiguous.
inline at::MemoryFormat dense_format(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// An empty tensor like x in dense_format(x) (dense_like in dmgrd/layout.py).
inline at::Tensor dense_like(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(dense_format(x)));
}

// ---- memory_nearest / dual_memory_margin: distances, ranking and argument checks ----

enum class Metric : int { L2 = 0, Cosine = 1 };

inline Metric parse_metric(const std::string& metric, const char* op) {
  if (metric == "l2") return Metric::L2;
  TORCH_CHECK(metric == "cosine", "dmgrd::", op, ": metric must be l2 or cosine, got ", metric);
  return Metric::Cosine;
}

// Per-row term of a distance from the row's sum of squares: itself (l2) or 1 / max(norm, eps) (cosine).
template <typename acc_t>
DMGRD_HOST_DEVICE inline acc_t row_term(Metric metric, acc_t squares) {
  if (metric == Metric::L2) return squares;
  return acc_t(1) / clamp_norm(acc_sqrt(squares), kNormEps);
}

// l2: max(|q|^2 + |m|^2 - 2 <q, m>, 0); cosine: 1 - <q, m> / (|q| |m|). NaN stays NaN.
template <Metric metric, typename acc_t>
DMGRD_HOST_DEVICE inline acc_t item_distance(acc_t dot, acc_t query_term, acc_t item_term) {
  if (metric == Metric::L2) {
    const acc_t d = query_term + item_term - acc_t(2) * dot;
    return d < acc_t(0) ? acc_t(0) : d;
  }
  return acc_t(1) - dot * query_term * item_term;
}

// The ranking of every backend (torch.sort(stable=True) of the distances): smaller distance first, NaN
// after everything else, equal distances (or two NaN) by the lower index.
template <typename acc_t>
DMGRD_HOST_DEVICE inline bool ranks_before(acc_t d1, int64_t i1, acc_t d2, int64_t i2) {
  if (d1 < d2) return true;
  const bool nan1 = d1 != d1, nan2 = d2 != d2;
  if (d1 == d2 || (nan1 && nan2)) return i1 < i2;
  return nan2 && !nan1;
}

// Running top-k kept sorted in dist[0..k) / index[0..k); empty slots hold (NaN, INT64_MAX), which rank last.
template <typename acc_t>
DMGRD_HOST_DEVICE inline void topk_reset(acc_t* dist, int64_t* index, int64_t k) {
  for (int64_t s = 0; s < k; ++s) {
    dist[s] = std::numeric_limits<acc_t>::quiet_NaN();
    index[s] = INT64_MAX;
  }
}

// Inserts (d, i) when it ranks before the current k-th entry.
template <typename acc_t>
DMGRD_HOST_DEVICE inline void topk_push(acc_t* dist, int64_t* index, int64_t k, acc_t d, int64_t i) {
  if (!ranks_before(d, i, dist[k - 1], index[k - 1])) return;
  int64_t s = k - 1;
  for (; s > 0 && ranks_before(d, i, dist[s - 1], index[s - 1]); --s) {
    dist[s] = dist[s - 1];
    index[s] = index[s - 1];
  }
  dist[s] = d;
  index[s] = i;
}

inline void check_nearest_args(const char* op, const at::Tensor& query, const at::Tensor& bank, int64_t k) {
  TORCH_CHECK(query.dim() == 2 && bank.dim() == 2, "dmgrd::", op, ": query and bank must be 2-D [rows, D], got ",
              query.sizes(), " and ", bank.sizes());
  TORCH_CHECK(query.size(1) == bank.size(1), "dmgrd::", op, ": query and bank feature sizes differ: ",
              query.size(1), " and ", bank.size(1));
  TORCH_CHECK(query.scalar_type() == bank.scalar_type() && query.is_floating_point(), "dmgrd::", op,
              ": query and bank must share one floating dtype");
  TORCH_CHECK(query.device() == bank.device(), "dmgrd::", op, ": query and bank must be on one device");
  TORCH_CHECK(k >= 1 && k <= bank.size(0), "dmgrd::", op, ": k must be in [1, bank rows], got ", k);
}

inline void check_dual_memory_margin_args(const at::Tensor& query, const at::Tensor& normal_bank,
                                          const at::Tensor& abnormal_bank, double margin) {
  check_nearest_args("dual_memory_margin", query, normal_bank, 1);
  check_nearest_args("dual_memory_margin", query, abnormal_bank, 1);
  TORCH_CHECK(margin >= 0, "dmgrd::dual_memory_margin: margin must be >= 0, got ", margin);
}

using DualMarginOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (d_normal, d_abnormal, index_normal, index_abnormal, relu(d_normal - d_abnormal + margin)) from the nearest
// item of each bank: dist [2, N, 1] (accumulation dtype), index [2, N, 1]; distances cast to `dtype`.
inline DualMarginOutputs dual_margin_outputs(const at::Tensor& dist, const at::Tensor& index, double margin,
                                             at::ScalarType dtype) {
  const at::Tensor d = dist.select(2, 0), i = index.select(2, 0);
  const at::Tensor hinge = at::relu(d[0] - d[1] + margin);
  return {d[0].to(dtype, false, true), d[1].to(dtype, false, true), i[0].clone(), i[1].clone(), hinge.to(dtype)};
}

}  // namespace dmgrd
