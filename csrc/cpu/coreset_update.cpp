// CPU kernel of dmgrd::coreset_update: one pass over the points computes each squared distance to the center,
// lowers min_dist and keeps the farthest point of each chunk of rows; the chunks (sized from the data, not the
// thread count) are merged in row order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common.h"

namespace dmgrd {
namespace {

constexpr int kLanes = 8;                // independent partial sums, so the compiler can vectorise
constexpr int64_t kGrainWork = 1 << 16;  // point features per chunk, at least

template <typename scalar_t, typename acc_t>
acc_t squared_distance(const scalar_t* point, const acc_t* center, int64_t dim) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t x = static_cast<acc_t>(point[i + j]) - center[i + j];
      part[j] += x * x;
    }
  }
  for (; i < dim; ++i) {
    const acc_t x = static_cast<acc_t>(point[i]) - center[i];
    part[0] += x * x;
  }
  acc_t total(0);
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

template <typename acc_t>
struct Farthest {
  acc_t value;
  int64_t index;
};

// Fills new_min for rows [begin, end) (begin < end) and returns their farthest row.
template <typename scalar_t, typename acc_t>
Farthest<acc_t> update_rows(const scalar_t* points, const acc_t* center, const acc_t* min_dist, acc_t* new_min,
                            int64_t dim, int64_t begin, int64_t end) {
  Farthest<acc_t> best{acc_t(0), -1};
  for (int64_t r = begin; r < end; ++r) {
    const acc_t d = squared_distance(points + r * dim, center, dim);
    const acc_t m = min_dist[r];
    const acc_t v = (d < m || d != d) ? d : m;  // minimum, NaN propagating
    new_min[r] = v;
    if (best.index < 0 || farther(v, best.value)) best = {v, r};
  }
  return best;
}

std::tuple<at::Tensor, at::Tensor> coreset_update_cpu(const at::Tensor& points_in, const at::Tensor& center_in,
                                                      const at::Tensor& min_dist_in) {
  check_coreset_update_args(points_in, center_in, min_dist_in);
  const at::Tensor points = points_in.contiguous();
  const at::Tensor min_dist = min_dist_in.contiguous();
  const int64_t rows = points.size(0), dim = points.size(1);
  at::Tensor new_min = at::empty_like(min_dist);
  at::Tensor farthest = at::empty({}, min_dist.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "dmgrd_coreset_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor center_acc = center_in.to(min_dist.scalar_type()).contiguous();
    const acc_t* center = center_acc.const_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(dim, 1));
    const int64_t chunks = at::divup(rows, grain);
    std::vector<Farthest<acc_t>> best(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        best[c] = update_rows(points.const_data_ptr<scalar_t>(), center, min_dist.const_data_ptr<acc_t>(),
                              new_min.mutable_data_ptr<acc_t>(), dim, c * grain, std::min(rows, (c + 1) * grain));
      }
    });
    Farthest<acc_t> result = best[0];
    for (int64_t c = 1; c < chunks; ++c) {
      if (farther(best[c].value, result.value)) result = best[c];
    }
    farthest.fill_(result.index);
  });
  return {new_min, farthest};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("coreset_update", &coreset_update_cpu); }

}  // namespace dmgrd
