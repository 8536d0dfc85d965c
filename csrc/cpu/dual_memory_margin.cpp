// CPU kernel of dmgrd::dual_memory_margin: one search over both banks (nearest_search.h, k = 1), then the hinge.
#include <torch/library.h>

#include <string>

#include "nearest_search.h"

namespace dmgrd {
namespace {

DualMarginOutputs dual_memory_margin_cpu(const at::Tensor& query, const at::Tensor& normal_bank,
                                         const at::Tensor& abnormal_bank, double margin, c10::string_view metric) {
  check_dual_memory_margin_args(query, normal_bank, abnormal_bank, margin);
  const Metric parsed = parse_metric(std::string(metric), "dual_memory_margin");
  const nearest_cpu::Result found = nearest_cpu::search(query, {normal_bank, abnormal_bank}, 1, parsed);
  return dual_margin_outputs(found.dist, found.index, margin, query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("dual_memory_margin", &dual_memory_margin_cpu); }

}  // namespace dmgrd
