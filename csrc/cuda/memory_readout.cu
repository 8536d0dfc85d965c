// CUDA kernels of dmgrd::memory_readout and its backward, flash-attention style (see dmgrd/ops/memory_readout.py):
//   forward    (query tile x D chunk per block): scores of 32 queries against bank tiles of 32 items, online
//              softmax, read-out accumulated for the block's D chunk; stores the lse and the query norms;
//   query grad (query tile x D chunk): recomputes P from the lse, dS = P (dP - rowsum(dO * O)), accumulates
//              sum_j dS_ij m_j / |m_j| and the cosine chain rule; stores rowsum(dO * O) for the next kernel;
//   bank grad  (bank tile x D chunk x query split): the same recomputation transposed, each split summing
//              sum_i P_ij dO_i and sum_i dS_ij q_i / |q_i| into its own slice; the slices are added after.
// Threads: 256 per block; thread t owns tile row t / 8 and, of that row, score columns t % 8 + 8 k and output
// columns t % 8 + 8 i, so the 8 threads of a row reduce with warp shuffles. Dot products accumulate in
// float32 (float64 for float64 inputs) from shared-memory chunks of kChunk features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common.h"
#include "launch.cuh"

namespace dmgrd::cuda_memory_readout {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;                    // queries or bank items per tile
constexpr int kLanes = kThreads / kTile;     // threads per tile row
constexpr int kScores = kTile / kLanes;      // score columns per thread
constexpr int64_t kTargetBlocks = 1024;      // bank-gradient blocks aimed at when splitting the queries

// Shared-memory sizes per accumulation type: feature chunk of the dot products, output D chunk of the
// forward and query-gradient kernels, and of the bank-gradient kernel (which stages two value tiles).
template <typename acc_t>
struct Dims {
  static constexpr int kChunk = sizeof(acc_t) == 4 ? 16 : 8;
  static constexpr int kOut = sizeof(acc_t) == 4 ? 256 : 64;
  static constexpr int kBankOut = sizeof(acc_t) == 4 ? 128 : 32;
};

__device__ inline float device_exp(float x) { return expf(x); }
__device__ inline double device_exp(double x) { return exp(x); }
__device__ inline float device_log(float x) { return logf(x); }
__device__ inline double device_log(double x) { return log(x); }

template <typename acc_t>
__device__ inline acc_t inverse_norm(acc_t norm) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (norm > eps ? norm : eps);
}

// Sum over the kLanes threads of one tile row (aligned groups of consecutive lanes).
template <typename acc_t>
__device__ inline acc_t row_sum(acc_t v) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ inline acc_t row_max(acc_t v) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// A tile of rows [row0, row0 + kTile) of a row-major [rows, dim] matrix; rows past the end read as zero.
template <typename scalar_t>
struct RowTile {
  const scalar_t* data;
  int64_t row0, rows, dim;

  template <typename acc_t>
  __device__ acc_t at(int r, int64_t d) const {
    return row0 + r < rows && d < dim ? static_cast<acc_t>(data[(row0 + r) * dim + d]) : acc_t(0);
  }
};

// <x_r, x_r> and <x_r, y_r> of the calling thread's tile row, full D.
template <typename scalar_t, typename acc_t>
__device__ acc_t row_dot(const RowTile<scalar_t>& x, const RowTile<scalar_t>& y) {
  const int r = threadIdx.x / kLanes;
  acc_t sum = 0;
  for (int64_t d = threadIdx.x % kLanes; d < x.dim; d += kLanes) sum += x.template at<acc_t>(r, d) * y.template at<acc_t>(r, d);
  return row_sum(sum);
}

// Raw dot products <x_r, y_c> for the calling thread's row r and columns c = lane + kLanes k.
template <typename scalar_t, typename acc_t>
__device__ void tile_dots(const RowTile<scalar_t>& x, const RowTile<scalar_t>& y,
                          acc_t (*xs)[Dims<acc_t>::kChunk + 1], acc_t (*ys)[Dims<acc_t>::kChunk + 1],
                          acc_t out[kScores]) {
  constexpr int kChunk = Dims<acc_t>::kChunk;
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  for (int k = 0; k < kScores; ++k) out[k] = 0;
  for (int64_t d0 = 0; d0 < x.dim; d0 += kChunk) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      xs[idx / kChunk][idx % kChunk] = x.template at<acc_t>(idx / kChunk, d0 + idx % kChunk);
      ys[idx / kChunk][idx % kChunk] = y.template at<acc_t>(idx / kChunk, d0 + idx % kChunk);
    }
    __syncthreads();
    for (int dd = 0; dd < kChunk; ++dd) {
      const acc_t xv = xs[r][dd];
      for (int k = 0; k < kScores; ++k) out[k] += xv * ys[lane + kLanes * k][dd];
    }
  }
}

// Copies columns [d0, d0 + width) of a row tile into shared memory (zeros outside).
template <int width, typename scalar_t, typename acc_t>
__device__ void stage_values(const RowTile<scalar_t>& x, int64_t d0, acc_t (*dst)[width]) {
  for (int idx = threadIdx.x; idx < kTile * width; idx += kThreads) {
    dst[idx / width][idx % width] = x.template at<acc_t>(idx / width, d0 + idx % width);
  }
}

// acc[i] += sum_c w[r][c] * v[c][lane + kLanes i] for the calling thread's row r.
template <int width, typename acc_t>
__device__ void accumulate(const acc_t (*w)[kTile + 1], const acc_t (*v)[width], acc_t* acc) {
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  for (int c = 0; c < kTile; ++c) {
    const acc_t wc = w[r][c];
    for (int i = 0; i < width / kLanes; ++i) acc[i] += wc * v[c][lane + kLanes * i];
  }
}

// Shared memory of the forward and query-gradient kernels (one query tile against one bank tile).
template <typename acc_t>
struct QueryTileShared {
  acc_t xs[kTile][Dims<acc_t>::kChunk + 1], ys[kTile][Dims<acc_t>::kChunk + 1];  // feature chunks of the dots
  acc_t w[kTile][kTile + 1];                    // per (query, item) weight of the value product
  acc_t inv_norm[kTile];                        // 1 / |m_j| of the tile's items
  acc_t values[kTile][Dims<acc_t>::kOut];       // the tile's bank rows, the block's D chunk
};

template <typename scalar_t, typename acc_t>
__device__ void stage_bank_tile(const RowTile<scalar_t>& m, const acc_t* __restrict__ inv_bank_norm, int64_t d0,
                                QueryTileShared<acc_t>& sh) {
  if (threadIdx.x < kTile) {
    sh.inv_norm[threadIdx.x] = m.row0 + threadIdx.x < m.rows ? inv_bank_norm[m.row0 + threadIdx.x] : acc_t(0);
  }
  stage_values<Dims<acc_t>::kOut>(m, d0, sh.values);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ bank,
                   const acc_t* __restrict__ inv_bank_norm, int64_t n, int64_t items, int64_t dim, acc_t inv_t,
                   scalar_t* __restrict__ out, acc_t* __restrict__ lse, acc_t* __restrict__ query_norm) {
  constexpr int kOut = Dims<acc_t>::kOut;
  __shared__ QueryTileShared<acc_t> sh;
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kOut;
  const RowTile<scalar_t> q{query, static_cast<int64_t>(blockIdx.x) * kTile, n, dim};
  const acc_t norm = acc_sqrt(row_dot<scalar_t, acc_t>(q, q));
  const acc_t scale = inverse_norm(norm) * inv_t;
  acc_t run_max = -std::numeric_limits<acc_t>::infinity(), run_sum = 0, acc[kOut / kLanes] = {};
  for (int64_t j0 = 0; j0 < items; j0 += kTile) {
    const RowTile<scalar_t> m{bank, j0, items, dim};
    acc_t s[kScores];
    tile_dots(q, m, sh.xs, sh.ys, s);  // starts with a barrier: the previous tile's shared data is consumed
    stage_bank_tile(m, inv_bank_norm, d0, sh);
    __syncthreads();
    acc_t tile_max = -std::numeric_limits<acc_t>::infinity();
    for (int k = 0; k < kScores; ++k) {
      const int c = lane + kLanes * k;
      s[k] = j0 + c < items ? s[k] * scale * sh.inv_norm[c] : -std::numeric_limits<acc_t>::infinity();
      tile_max = fmax(tile_max, s[k]);
    }
    const acc_t new_max = fmax(run_max, row_max(tile_max));
    const acc_t alpha = device_exp(run_max - new_max);
    acc_t tile_sum = 0;
    for (int k = 0; k < kScores; ++k) {
      const acc_t p = device_exp(s[k] - new_max);
      sh.w[r][lane + kLanes * k] = p;
      tile_sum += p;
    }
    run_sum = run_sum * alpha + row_sum(tile_sum);
    run_max = new_max;
    for (int i = 0; i < kOut / kLanes; ++i) acc[i] *= alpha;
    __syncthreads();
    accumulate<kOut>(sh.w, sh.values, acc);
  }
  const int64_t row = q.row0 + r;
  if (row >= n) return;
  for (int i = 0; i < kOut / kLanes; ++i) {
    const int64_t d = d0 + lane + kLanes * i;
    if (d < dim) out[row * dim + d] = static_cast<scalar_t>(acc[i] / run_sum);
  }
  if (blockIdx.y == 0 && lane == 0) {
    lse[row] = run_max + device_log(run_sum);
    query_norm[row] = norm;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    query_grad_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ bank,
                      const acc_t* __restrict__ inv_bank_norm, const scalar_t* __restrict__ out,
                      const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ lse,
                      const acc_t* __restrict__ query_norm, int64_t n, int64_t items, int64_t dim, acc_t inv_t,
                      scalar_t* __restrict__ grad_query, acc_t* __restrict__ delta_out) {
  constexpr int kOut = Dims<acc_t>::kOut;
  __shared__ QueryTileShared<acc_t> sh;
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kOut;
  const RowTile<scalar_t> q{query, static_cast<int64_t>(blockIdx.x) * kTile, n, dim};
  const RowTile<scalar_t> dout{grad_out, q.row0, n, dim};
  const int64_t row = q.row0 + r;
  const bool valid = row < n;
  const acc_t norm = valid ? query_norm[row] : acc_t(1);
  const acc_t row_lse = valid ? lse[row] : acc_t(0);
  const acc_t delta = row_dot<scalar_t, acc_t>(dout, RowTile<scalar_t>{out, q.row0, n, dim});
  const acc_t scale = inverse_norm(norm) * inv_t;
  acc_t score_grad = 0, acc[kOut / kLanes] = {};  // acc: sum_j dS_ij m_j / |m_j|
  for (int64_t j0 = 0; j0 < items; j0 += kTile) {
    const RowTile<scalar_t> m{bank, j0, items, dim};
    acc_t s[kScores], dp[kScores];
    tile_dots(q, m, sh.xs, sh.ys, s);
    tile_dots(dout, m, sh.xs, sh.ys, dp);
    stage_bank_tile(m, inv_bank_norm, d0, sh);
    __syncthreads();
    for (int k = 0; k < kScores; ++k) {
      const int c = lane + kLanes * k;
      const acc_t sv = s[k] * scale * sh.inv_norm[c];
      const acc_t p = j0 + c < items ? device_exp(sv - row_lse) : acc_t(0);
      const acc_t ds = p * (dp[k] - delta);
      score_grad += ds * sv;
      sh.w[r][c] = ds * sh.inv_norm[c];  // times the raw values: dS_ij m_j / |m_j|
    }
    __syncthreads();
    accumulate<kOut>(sh.w, sh.values, acc);
  }
  score_grad = row_sum(score_grad);
  if (!valid) return;
  const acc_t weight = norm >= static_cast<acc_t>(kNormEps) ? score_grad / (norm * norm) : acc_t(0);
  for (int i = 0; i < kOut / kLanes; ++i) {
    const int64_t d = d0 + lane + kLanes * i;
    if (d < dim) {
      grad_query[row * dim + d] = static_cast<scalar_t>(acc[i] * scale - q.template at<acc_t>(r, d) * weight);
    }
  }
  if (blockIdx.y == 0 && lane == 0) delta_out[row] = delta;
}

// Per query column of the current tile: the score scale 1 / (|q_i| T), the lse and rowsum(dO * O).
template <typename acc_t>
struct QueryColumns {
  acc_t scale[kTile], lse[kTile], delta[kTile];
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bank_grad_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ bank,
                     const acc_t* __restrict__ inv_bank_norm, const scalar_t* __restrict__ grad_out,
                     const acc_t* __restrict__ lse, const acc_t* __restrict__ query_norm,
                     const acc_t* __restrict__ delta, int64_t n, int64_t items, int64_t dim, acc_t inv_t,
                     int64_t tiles_per_split, acc_t* __restrict__ partial, acc_t* __restrict__ score_grad_out) {
  constexpr int kChunk = Dims<acc_t>::kChunk, kOut = Dims<acc_t>::kBankOut;
  __shared__ acc_t xs[kTile][kChunk + 1], ys[kTile][kChunk + 1], wp[kTile][kTile + 1], ws[kTile][kTile + 1];
  __shared__ acc_t dout_values[kTile][kOut], query_keys[kTile][kOut];
  __shared__ QueryColumns<acc_t> cols;
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kOut;
  const RowTile<scalar_t> m{bank, static_cast<int64_t>(blockIdx.x) * kTile, items, dim};
  const int64_t item = m.row0 + r;
  const acc_t inv_m = item < items ? inv_bank_norm[item] : acc_t(0);
  acc_t score_grad = 0, values[kOut / kLanes] = {}, keys[kOut / kLanes] = {};  // keys: sum_i dS_ij q_i / |q_i|
  const int64_t first = blockIdx.z * tiles_per_split * kTile;
  const int64_t last = std::min(first + tiles_per_split * kTile, n);
  for (int64_t i0 = first; i0 < last; i0 += kTile) {
    const RowTile<scalar_t> q{query, i0, n, dim}, dout{grad_out, i0, n, dim};
    acc_t s[kScores], dp[kScores];
    tile_dots(m, q, xs, ys, s);
    tile_dots(m, dout, xs, ys, dp);
    if (threadIdx.x < kTile) {
      const int64_t i = i0 + threadIdx.x;
      cols.scale[threadIdx.x] = i < n ? inverse_norm(query_norm[i]) * inv_t : acc_t(0);
      cols.lse[threadIdx.x] = i < n ? lse[i] : acc_t(0);
      cols.delta[threadIdx.x] = i < n ? delta[i] : acc_t(0);
    }
    stage_values<kOut>(dout, d0, dout_values);
    stage_values<kOut>(q, d0, query_keys);
    __syncthreads();
    for (int k = 0; k < kScores; ++k) {
      const int c = lane + kLanes * k;
      const acc_t sv = s[k] * inv_m * cols.scale[c];
      const acc_t p = i0 + c < n ? device_exp(sv - cols.lse[c]) : acc_t(0);
      const acc_t ds = p * (dp[k] - cols.delta[c]);
      score_grad += ds * sv;
      wp[r][c] = p;
      ws[r][c] = ds * cols.scale[c];
    }
    __syncthreads();
    accumulate<kOut>(wp, dout_values, values);
    accumulate<kOut>(ws, query_keys, keys);
  }
  score_grad = row_sum(score_grad);
  if (item >= items) return;
  acc_t* dst = partial + (static_cast<int64_t>(blockIdx.z) * items + item) * dim;
  for (int i = 0; i < kOut / kLanes; ++i) {
    const int64_t d = d0 + lane + kLanes * i;
    if (d < dim) dst[d] = values[i] + keys[i] * inv_m;
  }
  if (blockIdx.y == 0 && lane == 0) score_grad_out[blockIdx.z * items + item] = score_grad;
}

dim3 grid_of(int64_t x, int64_t y, int64_t z = 1) {
  return dim3(grid_x(x, "memory_readout"), grid_yz(y, "memory_readout"), grid_yz(z, "memory_readout"));
}

void check_cuda(const at::Tensor& query) {
  TORCH_CHECK(query.is_cuda(), "dmgrd::memory_readout (CUDA): inputs must be CUDA tensors, got ", query.device());
}

template <typename scalar_t>
void forward_impl(const at::Tensor& query, const at::Tensor& bank, double temperature, const InverseNorms& norms,
                  at::Tensor& out, at::Tensor& lse, at::Tensor& query_norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = query.size(0), items = bank.size(0), dim = query.size(1);
  forward_kernel<scalar_t, acc_t>
      <<<grid_of(ceil_div(n, kTile), ceil_div(dim, Dims<acc_t>::kOut)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          query.const_data_ptr<scalar_t>(), bank.const_data_ptr<scalar_t>(), norms.inverse.const_data_ptr<acc_t>(),
          n, items, dim, static_cast<acc_t>(1.0 / temperature), out.mutable_data_ptr<scalar_t>(),
          lse.mutable_data_ptr<acc_t>(), query_norm.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_readout_cuda(const at::Tensor& query_in,
                                                                   const at::Tensor& bank_in, double temperature) {
  check_memory_readout_args(query_in, bank_in, temperature);
  check_cuda(query_in);
  const c10::cuda::CUDAGuard device_guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), bank = bank_in.contiguous();
  const auto acc = accumulation_dtype(query.scalar_type());
  const InverseNorms norms = inverse_norms(bank.to(acc));
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({query.size(0)}, query.options().dtype(acc));
  at::Tensor query_norm = at::empty_like(lse);
  if (query.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dmgrd_memory_readout_cuda",
                                    [&] { forward_impl<scalar_t>(query, bank, temperature, norms, out, lse, query_norm); });
  }
  return {out, lse, query_norm};
}

// Launches both backward kernels; returns the bank gradient's per-split sums (partial [S, M, D], score_grad [S, M]).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& query,
                                                 const at::Tensor& bank, const at::Tensor& out, const at::Tensor& lse,
                                                 const at::Tensor& query_norm, double temperature,
                                                 const InverseNorms& norms, at::Tensor& grad_query) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = query.size(0), items = bank.size(0), dim = query.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::Tensor delta = at::empty_like(lse);
  query_grad_kernel<scalar_t, acc_t>
      <<<grid_of(ceil_div(n, kTile), ceil_div(dim, Dims<acc_t>::kOut)), kThreads, 0, stream>>>(
          query.const_data_ptr<scalar_t>(), bank.const_data_ptr<scalar_t>(), norms.inverse.const_data_ptr<acc_t>(),
          out.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
          query_norm.const_data_ptr<acc_t>(), n, items, dim, inv_t, grad_query.mutable_data_ptr<scalar_t>(),
          delta.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t query_tiles = ceil_div(n, kTile), bank_tiles = ceil_div(items, kTile);
  const int64_t d_chunks = ceil_div(dim, Dims<acc_t>::kBankOut);
  const int64_t tiles_per_split =
      ceil_div(query_tiles, std::min(query_tiles, ceil_div(kTargetBlocks, bank_tiles * d_chunks)));
  const int64_t splits = ceil_div(query_tiles, tiles_per_split);
  at::Tensor partial = at::empty({splits, items, dim}, lse.options());
  at::Tensor score_grad = at::empty({splits, items}, lse.options());
  bank_grad_kernel<scalar_t, acc_t><<<grid_of(bank_tiles, d_chunks, splits), kThreads, 0, stream>>>(
      query.const_data_ptr<scalar_t>(), bank.const_data_ptr<scalar_t>(), norms.inverse.const_data_ptr<acc_t>(),
      grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), query_norm.const_data_ptr<acc_t>(),
      delta.const_data_ptr<acc_t>(), n, items, dim, inv_t, tiles_per_split, partial.mutable_data_ptr<acc_t>(),
      score_grad.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, score_grad};
}

std::tuple<at::Tensor, at::Tensor> memory_readout_backward_cuda(const at::Tensor& grad_out_in,
                                                                const at::Tensor& query_in, const at::Tensor& bank_in,
                                                                const at::Tensor& out_in, const at::Tensor& lse_in,
                                                                const at::Tensor& query_norm_in, double temperature) {
  check_memory_readout_backward_args(grad_out_in, query_in, bank_in, out_in, lse_in, query_norm_in, temperature);
  check_cuda(query_in);
  const c10::cuda::CUDAGuard device_guard(query_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), query = query_in.contiguous(), bank = bank_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), query_norm = query_norm_in.contiguous();
  const at::Tensor bank_acc = bank.to(lse.scalar_type());
  const InverseNorms norms = inverse_norms(bank_acc);
  at::Tensor grad_query = at::empty_like(query);
  if (query.size(0) == 0) return {grad_query, at::zeros_like(bank)};
  std::tuple<at::Tensor, at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dmgrd_memory_readout_backward_cuda",
                                  [&] {
                                    sums = backward_impl<scalar_t>(grad_out, query, bank, out, lse, query_norm,
                                                                   temperature, norms, grad_query);
                                  });
  return {grad_query, finish_bank_grad(std::get<0>(sums).sum(0), std::get<1>(sums).sum(0), bank_acc, norms,
                                       bank.scalar_type())};
}

}  // namespace
}  // namespace dmgrd::cuda_memory_readout

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) {
  m.impl("memory_readout", &dmgrd::cuda_memory_readout::memory_readout_cuda);
  m.impl("memory_readout_backward", &dmgrd::cuda_memory_readout::memory_readout_backward_cuda);
}
