// Exact k-nearest search of query rows in one or two memory banks on CUDA, shared by dmgrd::memory_nearest and
// dmgrd::dual_memory_margin. A plain shared-memory tiling (the Triton kernel is the tensor-core path):
//   row_terms_kernel   one warp per row: |x|^2 (l2) or 1 / max(|x|, eps) (cosine) of every query and item.
//   search_kernel      one block per (block of kTileQ queries, split of the item tiles): 32 x 32 tiles of inner
//                      products through shared memory, distances into shared memory, then one thread per query
//                      feeds them in index order into its running top-k (k <= kMaxK, in local memory).
//   merge_kernel       one thread per (bank, query): the k best of the splits' lists (only with splits > 1).
// With few queries and items but a huge D (image-level search) D is split instead:
//   partial_kernel     one block per (query block, item tile, column split): partial inner products.
//   finish_kernel      one thread per (bank, query): sums the partials in split order, ranks every item.
// Distances and ranking are those of common.h; accumulation in float32 (float64 for float64 inputs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common.h"
#include "launch.cuh"

namespace dmgrd {
namespace nearest_cuda {

constexpr int kTileQ = 32;                   // queries per block
constexpr int kTileM = 32;                   // items per tile
constexpr int kTileD = 32;                   // columns per shared-memory step
constexpr int kThreads = 256;                // 16 x 16 threads, 2 x 2 products each
constexpr int kMaxK = 16;                    // neighbours kept per query
constexpr int kMaxBanks = 2;
constexpr int kTermThreads = 256;            // row_terms_kernel: 8 warps, one row each
constexpr int64_t kWideDepth = 4096;         // split D only from here on
constexpr int64_t kMaxWideEntries = 1 << 22;  // partial products kept on the wide path

template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t count, stride_row, stride_col;
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  return {x.const_data_ptr<scalar_t>(), x.size(0), x.stride(0), x.stride(1)};
}

template <typename scalar_t, typename acc_t>
struct Problem {
  Rows<scalar_t> query;
  Rows<scalar_t> bank[kMaxBanks];
  const acc_t* item_terms[kMaxBanks];
  int64_t tiles[kMaxBanks];  // item tiles per bank
  int nbanks;
  int64_t depth, k;
  const acc_t* query_terms;
};

template <typename scalar_t, typename acc_t, Metric metric>
__global__ void __launch_bounds__(kTermThreads) row_terms_kernel(Rows<scalar_t> x, int64_t depth, acc_t* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kTermThreads / 32) + threadIdx.x / 32;
  if (row >= x.count) return;  // whole warps leave together
  const scalar_t* base = x.data + row * x.stride_row;
  acc_t sum = 0;
  for (int64_t d = threadIdx.x % 32; d < depth; d += 32) {
    const acc_t v = static_cast<acc_t>(base[d * x.stride_col]);
    sum += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) out[row] = row_term(metric, sum);
}

// Loads rows [first, first + 32) x columns [d0, d0 + kTileD) of `x` (zero outside `rows` and `d_end`).
template <typename scalar_t, typename acc_t>
__device__ void load_tile(const Rows<scalar_t>& x, int64_t first, int64_t d0, int64_t d_end,
                          acc_t (*tile)[kTileD + 1]) {
  for (int e = threadIdx.x; e < 32 * kTileD; e += kThreads) {
    const int r = e / kTileD, c = e % kTileD;
    const int64_t row = first + r, col = d0 + c;
    tile[r][c] = row < x.count && col < d_end ? static_cast<acc_t>(x.data[row * x.stride_row + col * x.stride_col])
                                              : acc_t(0);
  }
}

// acc[i][j] = <query q0 + ty + 16 i, item m0 + tx + 16 j> over columns [d_begin, d_end) (all threads call it).
template <typename scalar_t, typename acc_t>
__device__ void tile_products(const Rows<scalar_t>& query, int64_t q0, const Rows<scalar_t>& bank, int64_t m0,
                              int64_t d_begin, int64_t d_end, acc_t (&acc)[2][2]) {
  __shared__ acc_t qs[kTileQ][kTileD + 1];
  __shared__ acc_t ms[kTileM][kTileD + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc[0][0] = acc[0][1] = acc[1][0] = acc[1][1] = acc_t(0);
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kTileD) {
    load_tile(query, q0, d0, d_end, qs);
    load_tile(bank, m0, d0, d_end, ms);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileD; ++c) {
      const acc_t a0 = qs[ty][c], a1 = qs[ty + 16][c], b0 = ms[tx][c], b1 = ms[tx + 16][c];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

// Block (query block blockIdx.x, split blockIdx.y): top-k of its queries among the split's item tiles (bank 0's
// tiles, then bank 1's) into dist/index [splits][banks][N][k].
template <typename scalar_t, typename acc_t, Metric metric>
__global__ void __launch_bounds__(kThreads)
    search_kernel(Problem<scalar_t, acc_t> p, int64_t tiles_per_split, acc_t* out_dist, int64_t* out_index) {
  __shared__ acc_t dist_tile[kTileQ][kTileM + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int64_t n = p.query.count;
  const int64_t my_query = q0 + threadIdx.x;  // the query whose top-k this thread keeps (threadIdx.x < kTileQ)
  acc_t best_dist[kMaxBanks][kMaxK];
  int64_t best_index[kMaxBanks][kMaxK];
  for (int b = 0; b < p.nbanks; ++b) topk_reset(best_dist[b], best_index[b], p.k);
  const int64_t total_tiles = p.tiles[0] + (p.nbanks > 1 ? p.tiles[1] : 0);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = std::min(total_tiles, t_begin + tiles_per_split);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int b = t < p.tiles[0] ? 0 : 1;
    const int64_t m0 = (b == 0 ? t : t - p.tiles[0]) * kTileM;
    const Rows<scalar_t> bank = p.bank[b];
    acc_t acc[2][2];
    tile_products(p.query, q0, bank, m0, 0, p.depth, acc);
    for (int i = 0; i < 2; ++i) {
      const int64_t q = q0 + ty + 16 * i;
      const acc_t q_term = q < n ? p.query_terms[q] : acc_t(0);
      for (int j = 0; j < 2; ++j) {
        const int64_t m = m0 + tx + 16 * j;
        const acc_t m_term = m < bank.count ? p.item_terms[b][m] : acc_t(0);
        dist_tile[ty + 16 * i][tx + 16 * j] = item_distance<metric>(acc[i][j], q_term, m_term);
      }
    }
    __syncthreads();
    if (threadIdx.x < kTileQ && my_query < n) {
      const int64_t count = std::min<int64_t>(kTileM, bank.count - m0);
      for (int64_t j = 0; j < count; ++j) {
        topk_push(best_dist[b], best_index[b], p.k, dist_tile[threadIdx.x][j], m0 + j);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x < kTileQ && my_query < n) {
    for (int b = 0; b < p.nbanks; ++b) {
      const int64_t at = ((static_cast<int64_t>(blockIdx.y) * p.nbanks + b) * n + my_query) * p.k;
      for (int64_t s = 0; s < p.k; ++s) {
        out_dist[at + s] = best_dist[b][s];
        out_index[at + s] = best_index[b][s];
      }
    }
  }
}

// One thread per (bank, query): the k best entries of `splits` lists [splits][lists][k].
template <typename acc_t>
__global__ void merge_kernel(const acc_t* part_dist, const int64_t* part_index, int64_t splits, int64_t lists,
                             int64_t k, acc_t* out_dist, int64_t* out_index) {
  const int64_t list = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (list >= lists) return;
  acc_t dist[kMaxK];
  int64_t index[kMaxK];
  topk_reset(dist, index, k);
  for (int64_t s = 0; s < splits; ++s) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = (s * lists + list) * k + j;
      topk_push(dist, index, k, part_dist[at], part_index[at]);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    out_dist[list * k + j] = dist[j];
    out_index[list * k + j] = index[j];
  }
}

// Block (query block, item tile over all banks, column split): partial products into
// partial[split][N][items] (bank 0's items, then bank 1's).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(Problem<scalar_t, acc_t> p, int64_t depth_per_split, int64_t items, acc_t* partial) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int64_t t = blockIdx.y;
  const int b = t < p.tiles[0] ? 0 : 1;
  const int64_t m0 = (b == 0 ? t : t - p.tiles[0]) * kTileM;
  const int64_t offset = b == 0 ? 0 : p.bank[0].count;
  const int64_t d_begin = static_cast<int64_t>(blockIdx.z) * depth_per_split;
  const int64_t d_end = std::min(p.depth, d_begin + depth_per_split);
  acc_t acc[2][2];
  tile_products(p.query, q0, p.bank[b], m0, d_begin, d_end, acc);
  const int64_t n = p.query.count;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t q = q0 + ty + 16 * i, m = m0 + tx + 16 * j;
      if (q < n && m < p.bank[b].count) partial[(blockIdx.z * n + q) * items + offset + m] = acc[i][j];
    }
  }
}

// One thread per (bank, query): every item's product summed over the splits in order, ranked into [banks][N][k].
template <typename scalar_t, typename acc_t, Metric metric>
__global__ void finish_kernel(Problem<scalar_t, acc_t> p, const acc_t* partial, int64_t splits, int64_t items,
                              acc_t* out_dist, int64_t* out_index) {
  const int64_t n = p.query.count;
  const int64_t list = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (list >= p.nbanks * n) return;
  const int b = static_cast<int>(list / n);
  const int64_t q = list % n, offset = b == 0 ? 0 : p.bank[0].count;
  acc_t dist[kMaxK];
  int64_t index[kMaxK];
  topk_reset(dist, index, p.k);
  for (int64_t m = 0; m < p.bank[b].count; ++m) {
    acc_t dot = 0;
    for (int64_t s = 0; s < splits; ++s) dot += partial[(s * n + q) * items + offset + m];
    topk_push(dist, index, p.k, item_distance<metric>(dot, p.query_terms[q], p.item_terms[b][m]), m);
  }
  for (int64_t j = 0; j < p.k; ++j) {
    out_dist[list * p.k + j] = dist[j];
    out_index[list * p.k + j] = index[j];
  }
}

// dist [banks, N, k] (accumulation dtype) and index [banks, N, k] int64.
struct Result {
  at::Tensor dist, index;
};

template <typename scalar_t, typename acc_t, Metric metric>
Result search_typed(const at::Tensor& query, const std::vector<at::Tensor>& banks, int64_t k) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = query.size(0), depth = query.size(1);
  const int nbanks = static_cast<int>(banks.size());
  const auto acc_options = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Result result{at::empty({nbanks, n, k}, acc_options), at::empty({nbanks, n, k}, query.options().dtype(at::kLong))};
  if (n == 0) return result;

  Problem<scalar_t, acc_t> p{};
  p.query = rows_of<scalar_t>(query);
  p.nbanks = nbanks;
  p.depth = depth;
  p.k = k;
  at::Tensor query_terms = at::empty({n}, acc_options);
  std::vector<at::Tensor> item_terms;
  int64_t items = 0, tiles = 0;
  auto launch_terms = [&](const Rows<scalar_t>& rows, acc_t* out) {
    row_terms_kernel<scalar_t, acc_t, metric>
        <<<grid_x(ceil_div(rows.count, kTermThreads / 32), "nearest search: row norms"), kTermThreads, 0, stream>>>(rows, depth,
                                                                                                      out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  launch_terms(p.query, query_terms.mutable_data_ptr<acc_t>());
  p.query_terms = query_terms.const_data_ptr<acc_t>();
  for (int b = 0; b < nbanks; ++b) {
    p.bank[b] = rows_of<scalar_t>(banks[b]);
    item_terms.push_back(at::empty({banks[b].size(0)}, acc_options));
    launch_terms(p.bank[b], item_terms.back().mutable_data_ptr<acc_t>());
    p.item_terms[b] = item_terms.back().const_data_ptr<acc_t>();
    p.tiles[b] = ceil_div(banks[b].size(0), kTileM);
    items += banks[b].size(0);
    tiles += p.tiles[b];
  }

  int device_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, query.device().index()));
  const int64_t target = 4 * static_cast<int64_t>(device_sms);
  const int64_t qblocks = ceil_div(n, kTileQ);
  acc_t* out_dist = result.dist.mutable_data_ptr<acc_t>();
  int64_t* out_index = result.index.mutable_data_ptr<int64_t>();

  if (qblocks * tiles < target && depth >= kWideDepth) {
    int64_t splits = std::min(ceil_div(target, qblocks * tiles), ceil_div(depth, kTileD));
    splits = std::max<int64_t>(1, std::min(splits, kMaxWideEntries / std::max<int64_t>(1, n * items)));
    const int64_t depth_per_split = ceil_div(ceil_div(depth, splits), kTileD) * kTileD;
    splits = ceil_div(depth, depth_per_split);
    at::Tensor partial = at::empty({splits, n, items}, acc_options);
    const dim3 grid(grid_x(qblocks, "nearest search: partial products"),
                    grid_yz(tiles, "nearest search: partial products"),
                    grid_yz(splits, "nearest search: partial products"));
    partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(p, depth_per_split, items,
                                                                    partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<scalar_t, acc_t, metric><<<grid_x(ceil_div(nbanks * n, 128), "nearest search: ranking"), 128, 0, stream>>>(
        p, partial.const_data_ptr<acc_t>(), splits, items, out_dist, out_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return result;
  }

  int64_t splits = std::min(tiles, std::max<int64_t>(1, ceil_div(target, qblocks)));
  const int64_t tiles_per_split = ceil_div(tiles, splits);
  splits = ceil_div(tiles, tiles_per_split);
  Result parts = result;
  if (splits > 1) {
    parts = {at::empty({splits * nbanks, n, k}, acc_options),
             at::empty({splits * nbanks, n, k}, result.index.options())};
  }
  const dim3 grid(grid_x(qblocks, "nearest search"), grid_yz(splits, "nearest search"));
  search_kernel<scalar_t, acc_t, metric><<<grid, kThreads, 0, stream>>>(
      p, tiles_per_split, parts.dist.mutable_data_ptr<acc_t>(), parts.index.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t lists = nbanks * n;
    merge_kernel<acc_t><<<grid_x(ceil_div(lists, 128), "nearest search: merge"), 128, 0, stream>>>(
        parts.dist.const_data_ptr<acc_t>(), parts.index.const_data_ptr<int64_t>(), splits, lists, k, out_dist,
        out_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return result;
}

// Nearest k (<= kMaxK) items of every query row in each bank; all on one CUDA device, one dtype.
inline Result search(const at::Tensor& query, const std::vector<at::Tensor>& banks, int64_t k, Metric metric,
                     const char* op) {
  TORCH_CHECK(query.is_cuda(), "dmgrd::", op, " (CUDA): query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(k <= kMaxK, "dmgrd::", op, " (CUDA): k must be at most ", kMaxK, ", got ", k);
  const c10::cuda::CUDAGuard device_guard(query.device());
  Result result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dmgrd_nearest_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (metric == Metric::L2) {
      result = search_typed<scalar_t, acc_t, Metric::L2>(query, banks, k);
    } else {
      result = search_typed<scalar_t, acc_t, Metric::Cosine>(query, banks, k);
    }
  });
  return result;
}

}  // namespace nearest_cuda
}  // namespace dmgrd
