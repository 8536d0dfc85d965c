// CPU kernel of dmgrd::memory_nearest: the tiled at::mm + fused running top-k search of nearest_search.h.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "nearest_search.h"

namespace dmgrd {
namespace {

std::tuple<at::Tensor, at::Tensor> memory_nearest_cpu(const at::Tensor& query, const at::Tensor& bank, int64_t k,
                                                      c10::string_view metric) {
  check_nearest_args("memory_nearest", query, bank, k);
  const Metric parsed = parse_metric(std::string(metric), "memory_nearest");
  const nearest_cpu::Result found = nearest_cpu::search(query, {bank}, k, parsed);
  return {found.dist[0].to(query.scalar_type()), found.index[0]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) { m.impl("memory_nearest", &memory_nearest_cpu); }

}  // namespace dmgrd
