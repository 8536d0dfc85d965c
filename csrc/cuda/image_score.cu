// CUDA kernels of dmgrd::image_score, one block per image: the maximum (block reduction), or the mean of the
// k largest pixels found by an exact radix select on order-preserving unsigned keys.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <math_constants.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "../common.h"

namespace dmgrd::cuda_image_score {
namespace {

constexpr int kScoreThreads = 1024;
constexpr int kMaxWarps = kScoreThreads / 32;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Unsigned keys whose order is the float order (-inf < ... < -0.0 < +0.0 < ... < +inf); NaN is never keyed.
template <typename acc_t>
struct FloatKey;

template <>
struct FloatKey<float> {
  using key_t = uint32_t;
  static constexpr key_t kSign = 0x80000000u;
  __device__ static key_t key(float v) {
    const key_t u = __float_as_uint(v);
    return (u & kSign) ? ~u : (u | kSign);
  }
  __device__ static float value(key_t k) { return __uint_as_float((k & kSign) ? (k ^ kSign) : ~k); }
  __device__ static float nan() { return CUDART_NAN_F; }
  __device__ static float lowest() { return -CUDART_INF_F; }
};

template <>
struct FloatKey<double> {
  using key_t = unsigned long long;
  static constexpr key_t kSign = 0x8000000000000000ull;
  __device__ static key_t key(double v) {
    const key_t u = static_cast<key_t>(__double_as_longlong(v));
    return (u & kSign) ? ~u : (u | kSign);
  }
  __device__ static double value(key_t k) {
    return __longlong_as_double(static_cast<long long>((k & kSign) ? (k ^ kSign) : ~k));
  }
  __device__ static double nan() { return CUDART_NAN; }
  __device__ static double lowest() { return -CUDART_INF; }
};

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Reduces v over the block (blockDim.x a multiple of 32); the result is valid in thread 0 only.
// Must be reached by every thread; `warp_partial` holds kMaxWarps values.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* warp_partial) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_partial[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = static_cast<int>(blockDim.x / 32);
    for (int w = 1; w < warps; ++w) v = op(v, warp_partial[w]);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kScoreThreads)
    max_score_kernel(const scalar_t* __restrict__ maps, int64_t pixels, scalar_t* __restrict__ out) {
  __shared__ acc_t warp_partial[kMaxWarps];
  const scalar_t* map = maps + static_cast<int64_t>(blockIdx.x) * pixels;
  acc_t best = FloatKey<acc_t>::lowest();
  bool nan = false;
  for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(map[p]);
    nan = nan || at::_isnan(v);
    best = MaxOp()(best, v);
  }
  const bool any_nan = __syncthreads_or(nan) != 0;
  best = block_reduce(best, MaxOp(), warp_partial);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<scalar_t>(any_nan ? FloatKey<acc_t>::nan() : best);
}

// Thread 0: walks the bins from the top; returns the digit holding the `remaining`-th largest key of the
// current bucket and subtracts from `remaining` the keys in higher bins.
__device__ inline unsigned int select_digit(const unsigned int* hist, int64_t& remaining) {
  for (int d = kRadixBins - 1; d > 0; --d) {
    if (static_cast<int64_t>(hist[d]) >= remaining) return static_cast<unsigned int>(d);
    remaining -= hist[d];
  }
  return 0;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kScoreThreads)
    topk_mean_kernel(const scalar_t* __restrict__ maps, int64_t pixels, int64_t k, scalar_t* __restrict__ out) {
  using Key = FloatKey<acc_t>;
  using key_t = typename Key::key_t;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  __shared__ unsigned int hist[kRadixBins];
  __shared__ key_t shared_prefix;
  __shared__ int64_t shared_remaining;
  __shared__ acc_t warp_partial[kMaxWarps];
  const scalar_t* map = maps + static_cast<int64_t>(blockIdx.x) * pixels;

  // After the pass at `shift`, the bits of `prefix` selected by `mask` equal the k-th largest key's, and
  // `remaining` is the rank of that key among the keys sharing those bits.
  key_t prefix = 0;
  key_t mask = 0;
  int64_t remaining = k;
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int d = threadIdx.x; d < kRadixBins; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    bool nan = false;
    for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
      const acc_t v = static_cast<acc_t>(map[p]);
      nan = nan || at::_isnan(v);
      const key_t key = Key::key(v);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)], 1u);
    }
    if (__syncthreads_or(nan)) {  // uniform: any NaN makes the score NaN
      if (threadIdx.x == 0) out[blockIdx.x] = static_cast<scalar_t>(Key::nan());
      return;
    }
    if (threadIdx.x == 0) {
      shared_prefix = prefix | (static_cast<key_t>(select_digit(hist, remaining)) << shift);
      shared_remaining = remaining;
    }
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    mask |= static_cast<key_t>(kRadixBins - 1) << shift;
  }

  // prefix is the k-th largest key T: the top k are every key > T plus `remaining` copies of T.
  acc_t sum = 0;
  for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(map[p]);
    if (Key::key(v) > prefix) sum += v;
  }
  sum = block_reduce(sum, SumOp(), warp_partial);
  if (threadIdx.x == 0) {
    const acc_t total = sum + static_cast<acc_t>(remaining) * Key::value(prefix);
    out[blockIdx.x] = static_cast<scalar_t>(total / static_cast<acc_t>(k));
  }
}

at::Tensor image_score_cuda(const at::Tensor& anomaly_map, std::string_view mode_name, int64_t k) {
  const std::string mode(mode_name);
  check_image_score_args(anomaly_map, mode, k);
  TORCH_CHECK(anomaly_map.is_cuda(), "dmgrd::image_score (CUDA): anomaly_map must be a CUDA tensor, got ",
              anomaly_map.device());
  const int64_t batch = anomaly_map.size(0);
  const int64_t pixels = anomaly_map.size(1) * anomaly_map.size(2);
  TORCH_CHECK(pixels > 0, "dmgrd::image_score (CUDA): anomaly_map has no pixels: ", anomaly_map.sizes());
  TORCH_CHECK(pixels <= std::numeric_limits<int32_t>::max(), "dmgrd::image_score (CUDA): at most 2^31 - 1 pixels "
              "per image are supported, got ", pixels);
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "dmgrd::image_score (CUDA): batch ", batch,
              " exceeds 2^31 - 1");
  const c10::cuda::CUDAGuard device_guard(anomaly_map.device());
  const at::Tensor maps = anomaly_map.contiguous();
  at::Tensor out = at::empty({batch}, maps.options());
  if (batch == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = static_cast<unsigned int>(batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "dmgrd_image_score_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (mode == "max") {
      max_score_kernel<scalar_t, acc_t><<<blocks, kScoreThreads, 0, stream>>>(
          maps.const_data_ptr<scalar_t>(), pixels, out.mutable_data_ptr<scalar_t>());
    } else {
      topk_mean_kernel<scalar_t, acc_t><<<blocks, kScoreThreads, 0, stream>>>(
          maps.const_data_ptr<scalar_t>(), pixels, k, out.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dmgrd::cuda_image_score

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) { m.impl("image_score", &dmgrd::cuda_image_score::image_score_cuda); }
