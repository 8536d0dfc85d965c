// CUDA kernel of dmgrd::dual_memory_margin: one search over both banks (nearest_search.cuh, k = 1), then the hinge.
#include <torch/library.h>

#include <string>
#include <string_view>

#include "nearest_search.cuh"

namespace dmgrd::cuda_dual_memory_margin {
namespace {

DualMarginOutputs dual_memory_margin_cuda(const at::Tensor& query, const at::Tensor& normal_bank,
                                          const at::Tensor& abnormal_bank, double margin, std::string_view metric) {
  check_dual_memory_margin_args(query, normal_bank, abnormal_bank, margin);
  const Metric parsed = parse_metric(std::string(metric), "dual_memory_margin");
  const nearest_cuda::Result found =
      nearest_cuda::search(query, {normal_bank, abnormal_bank}, 1, parsed, "dual_memory_margin");
  return dual_margin_outputs(found.dist, found.index, margin, query.scalar_type());
}

}  // namespace
}  // namespace dmgrd::cuda_dual_memory_margin

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) { m.impl("dual_memory_margin", &dmgrd::cuda_dual_memory_margin::dual_memory_margin_cuda); }
