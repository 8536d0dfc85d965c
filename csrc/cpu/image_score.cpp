// CPU kernel of dmgrd::image_score: per-image max, or mean of the k largest pixels kept in a min-heap
// (one pass; a value enters only when it beats the smallest of the current k).
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
acc_t max_score(const scalar_t* values, int64_t n) {
  constexpr int64_t kLanes = 16;  // independent running maxima, so the loop vectorises
  acc_t best[kLanes];
  bool nan[kLanes] = {};
  std::fill(best, best + kLanes, -std::numeric_limits<acc_t>::infinity());
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t x = static_cast<acc_t>(values[i + j]);
      best[j] = x > best[j] ? x : best[j];
      nan[j] |= x != x;
    }
  }
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  bool any_nan = false;
  for (int64_t j = 0; j < kLanes; ++j) {
    result = std::max(result, best[j]);
    any_nan |= nan[j];
  }
  for (int64_t i = whole; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(values[i]);
    result = std::max(result, x);
    any_nan |= x != x;
  }
  return any_nan ? std::numeric_limits<acc_t>::quiet_NaN() : result;
}

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
  const bool topk = mode == "topk_mean";
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
        const acc_t score =
            topk ? topk_mean_score<scalar_t, acc_t>(values, pixels, k, heap) : max_score<scalar_t, acc_t>(values, pixels);
        out[b] = static_cast<scalar_t>(score);
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("image_score", &image_score_cpu); }

}  // namespace dmgrd
