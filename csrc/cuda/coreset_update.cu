// CUDA kernels of dmgrd::coreset_update. Pass 1: one warp per point row (grid-stride) computes the squared
// distance to the center, writes the lowered min_dist, and each block reduces its farthest row to one candidate.
// Pass 2: one block reduces the block candidates to the farthest index (ties: lowest index, NaN largest).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../common.h"

namespace dmgrd::cuda_coreset {
namespace {

constexpr int kUpdateThreads = 256;
constexpr int kUpdateWarps = kUpdateThreads / 32;
constexpr int kReduceThreads = 1024;
constexpr int64_t kMaxBlocks = 2048;

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t index;  // < 0: no row
};

template <typename acc_t>
__device__ inline bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  if (farther(a.value, b.value)) return true;
  if (farther(b.value, a.value)) return false;
  return a.index < b.index;
}

template <typename acc_t>
__device__ inline Candidate<acc_t> warp_best(Candidate<acc_t> c) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Candidate<acc_t> other{__shfl_xor_sync(0xffffffffu, c.value, offset),
                                 __shfl_xor_sync(0xffffffffu, c.index, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

// The best candidate of the block, valid in thread 0; `shared` holds one candidate per warp.
template <typename acc_t>
__device__ inline Candidate<acc_t> block_best(Candidate<acc_t> c, Candidate<acc_t>* shared) {
  c = warp_best(c);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      if (better(shared[w], c)) c = shared[w];
    }
  }
  return c;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUpdateThreads)
    update_kernel(const scalar_t* __restrict__ points, const scalar_t* __restrict__ center,
                  const acc_t* __restrict__ min_dist, acc_t* __restrict__ new_min, int64_t rows, int64_t dim,
                  acc_t* __restrict__ block_value, int64_t* __restrict__ block_index) {
  __shared__ Candidate<acc_t> shared[kUpdateWarps];
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kUpdateWarps;
  Candidate<acc_t> best{acc_t(0), -1};
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kUpdateWarps + threadIdx.x / 32; r < rows; r += warps) {
    const scalar_t* point = points + r * dim;
    acc_t sum = 0;
    for (int64_t i = lane; i < dim; i += 32) {
      const acc_t x = static_cast<acc_t>(point[i]) - static_cast<acc_t>(center[i]);
      sum += x * x;
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const acc_t m = min_dist[r];
    const acc_t v = (sum < m || sum != sum) ? sum : m;  // minimum, NaN propagating
    if (lane == 0) new_min[r] = v;
    const Candidate<acc_t> here{v, r};
    if (better(here, best)) best = here;
  }
  best = block_best(best, shared);
  if (threadIdx.x == 0) {
    block_value[blockIdx.x] = best.value;
    block_index[blockIdx.x] = best.index;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    farthest_kernel(const acc_t* __restrict__ block_value, const int64_t* __restrict__ block_index, int64_t blocks,
                    int64_t* __restrict__ farthest) {
  __shared__ Candidate<acc_t> shared[kReduceThreads / 32];
  Candidate<acc_t> best{acc_t(0), -1};
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    const Candidate<acc_t> here{block_value[b], block_index[b]};
    if (better(here, best)) best = here;
  }
  best = block_best(best, shared);
  if (threadIdx.x == 0) *farthest = best.index;
}

std::tuple<at::Tensor, at::Tensor> coreset_update_cuda(const at::Tensor& points_in, const at::Tensor& center_in,
                                                       const at::Tensor& min_dist_in) {
  check_coreset_update_args(points_in, center_in, min_dist_in);
  TORCH_CHECK(points_in.is_cuda(), "dmgrd::coreset_update (CUDA): points must be a CUDA tensor, got ",
              points_in.device());
  const c10::cuda::CUDAGuard device_guard(points_in.device());
  const at::Tensor points = points_in.contiguous();
  const at::Tensor center = center_in.contiguous();
  const at::Tensor min_dist = min_dist_in.contiguous();
  const int64_t rows = points.size(0), dim = points.size(1);
  const int64_t blocks = std::min(kMaxBlocks, (rows + kUpdateWarps - 1) / kUpdateWarps);
  at::Tensor new_min = at::empty_like(min_dist);
  at::Tensor farthest = at::empty({}, min_dist.options().dtype(at::kLong));
  at::Tensor block_value = at::empty({blocks}, min_dist.options());
  at::Tensor block_index = at::empty({blocks}, farthest.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "dmgrd_coreset_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    update_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kUpdateThreads, 0, stream>>>(
        points.const_data_ptr<scalar_t>(), center.const_data_ptr<scalar_t>(), min_dist.const_data_ptr<acc_t>(),
        new_min.mutable_data_ptr<acc_t>(), rows, dim, block_value.mutable_data_ptr<acc_t>(),
        block_index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    farthest_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(block_value.const_data_ptr<acc_t>(),
                                                              block_index.const_data_ptr<int64_t>(), blocks,
                                                              farthest.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {new_min, farthest};
}

}  // namespace
}  // namespace dmgrd::cuda_coreset

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) { m.impl("coreset_update", &dmgrd::cuda_coreset::coreset_update_cuda); }
