// CUDA kernel of dmgrd::memory_nearest: the shared-memory tiled search of nearest_search.cuh (k <= 16).
#include <torch/library.h>

#include <string>
#include <string_view>
#include <tuple>

#include "nearest_search.cuh"

namespace dmgrd::cuda_memory_nearest {
namespace {

std::tuple<at::Tensor, at::Tensor> memory_nearest_cuda(const at::Tensor& query, const at::Tensor& bank, int64_t k,
                                                       std::string_view metric) {
  check_nearest_args("memory_nearest", query, bank, k);
  const Metric parsed = parse_metric(std::string(metric), "memory_nearest");
  const nearest_cuda::Result found = nearest_cuda::search(query, {bank}, k, parsed, "memory_nearest");
  return {found.dist[0].to(query.scalar_type()), found.index[0]};
}

}  // namespace
}  // namespace dmgrd::cuda_memory_nearest

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) { m.impl("memory_nearest", &dmgrd::cuda_memory_nearest::memory_nearest_cuda); }
