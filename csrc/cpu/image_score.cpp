// CPU kernel of dmgrd::image_score: the mean of the k largest pixels kept in a min-heap (one pass; a value
// enters only when it beats the smallest of the current k). The max is ATen's own vectorised reduction.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "../common.h"

namespace dmgrd {
namespace {

template <typename scalar_t, typename acc_t>
acc_t topk_mean_score(const scalar_t* values, int64_t n, int64_t k, std::vector<acc_t>& heap) {
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  heap.clear();
  for (int64_t i = 0; i < k; ++i) {
    const acc_t x = static_cast<acc_t>(values[i]);
    if (x != x) return nan;
    heap.push_back(x);
  }
  std::make_heap(heap.begin(), heap.end(), std::greater<acc_t>());
  for (int64_t i = k; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(values[i]);
    if (x > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<acc_t>());
      heap.back() = x;
      std::push_heap(heap.begin(), heap.end(), std::greater<acc_t>());
    } else if (x != x) {
      return nan;
    }
  }
  acc_t total(0);
  for (acc_t x : heap) total += x;
  return total / static_cast<acc_t>(k);
}

at::Tensor image_score_cpu(const at::Tensor& anomaly_map, c10::string_view mode, int64_t k) {
  check_image_score_args(anomaly_map, std::string(mode), k);
  if (mode == "max") return at::amax(anomaly_map.flatten(1), 1);  // ATen's vectorised reduction; NaN propagates
  const at::Tensor maps = anomaly_map.contiguous();
  const int64_t batch = maps.size(0), pixels = maps.size(1) * maps.size(2);
  at::Tensor scores = at::empty({batch}, maps.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "dmgrd_image_score_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = maps.const_data_ptr<scalar_t>();
    scalar_t* out = scores.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> heap;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* values = in + b * pixels;
        out[b] = static_cast<scalar_t>(topk_mean_score<scalar_t, acc_t>(values, pixels, k, heap));
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("image_score", &image_score_cpu); }

}  // namespace dmgrd
