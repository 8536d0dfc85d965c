// CUDA kernels of dmgrd::anomaly_map, in three steps:
//   K1 (one launch per level): cosine distance at the level's own resolution -> dist_l [B, H_l, W_l];
//   K2 (one block per output row): bilinear upsampling + level combine into shared memory, then the
//      horizontal Gaussian pass -> tmp [B, Ho, Wo] (or straight to the output when sigma == 0);
//   K3 (one thread per output pixel): vertical Gaussian pass tmp -> out [B, 1, Ho, Wo].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "../common.h"
#include "launch.cuh"

namespace dmgrd::cuda_anomaly_map {
namespace {

constexpr int kPixelsPerBlock = 32;  // K1 blockDim.x
constexpr int kChannelGroups = 8;    // K1 blockDim.y
constexpr int kRowThreads = 256;     // K2 blockDim.x
constexpr int kBlurThreads = 256;    // K3 blockDim.x
constexpr int kMaxLevels = 8;
constexpr int64_t kMaxRowBytes = 48 * 1024;

template <typename acc_t>
struct LevelMeta {
  const acc_t* dist;  // [B, height, width], contiguous
  int64_t height, width;
  acc_t scale_h, scale_w;
};

template <typename acc_t>
struct Levels {
  LevelMeta<acc_t> level[kMaxLevels];
  int count;
};

template <typename acc_t>
__device__ inline acc_t cosine_distance(acc_t dot, acc_t tt, acc_t ss) {
  return acc_t(1) - dot / (clamp_norm(acc_sqrt(tt)) * clamp_norm(acc_sqrt(ss)));
}

// K1. Block: kPixelsPerBlock pixels (x) of the flattened [B, H*W] range times kChannelGroups channel
// groups (y); thread (x, y) sums channels y, y + kChannelGroups, ...
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelsPerBlock* kChannelGroups)
    cosine_distance_kernel(const scalar_t* __restrict__ teacher, Strides4 ts, const scalar_t* __restrict__ student,
                           Strides4 ss, int64_t channels, int64_t height, int64_t width, int64_t total,
                           acc_t* __restrict__ dist) {
  __shared__ acc_t partial[3][kChannelGroups][kPixelsPerBlock];
  const int x = threadIdx.x;
  const int y = threadIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock + x;
  acc_t dot = 0, t_sq = 0, s_sq = 0;
  if (p < total) {
    const int64_t plane = height * width;
    const int64_t b = p / plane;
    const int64_t h = (p % plane) / width;
    const int64_t w = p % width;
    const scalar_t* t = teacher + b * ts.b + h * ts.h + w * ts.w;
    const scalar_t* s = student + b * ss.b + h * ss.h + w * ss.w;
    for (int64_t c = y; c < channels; c += kChannelGroups) {
      const acc_t tv = static_cast<acc_t>(t[c * ts.c]);
      const acc_t sv = static_cast<acc_t>(s[c * ss.c]);
      dot += tv * sv;
      t_sq += tv * tv;
      s_sq += sv * sv;
    }
  }
  partial[0][y][x] = dot;
  partial[1][y][x] = t_sq;
  partial[2][y][x] = s_sq;
  __syncthreads();
  if (y == 0 && p < total) {
    for (int g = 1; g < kChannelGroups; ++g) {
      dot += partial[0][g][x];
      t_sq += partial[1][g][x];
      s_sq += partial[2][g][x];
    }
    dist[p] = cosine_distance(dot, t_sq, s_sq);
  }
}

// dist of one level at output pixel (i, j), as ATen's upsample_bilinear2d (align_corners=True) computes it,
// including its plain copy when the level already has the output size.
template <typename acc_t>
__device__ inline acc_t upsampled(const LevelMeta<acc_t>& lv, int64_t b, int64_t i, int64_t j, int64_t out_h,
                                  int64_t out_w) {
  const acc_t* plane = lv.dist + b * lv.height * lv.width;
  if (lv.height == out_h && lv.width == out_w) return plane[i * out_w + j];
  const LinearTap<acc_t> th = linear_tap(lv.scale_h, i, lv.height);
  const LinearTap<acc_t> tw = linear_tap(lv.scale_w, j, lv.width);
  const acc_t* r0 = plane + th.i0 * lv.width;
  const acc_t* r1 = plane + th.i1 * lv.width;
  return th.w0 * (tw.w0 * r0[tw.i0] + tw.w1 * r0[tw.i1]) + th.w1 * (tw.w0 * r1[tw.i0] + tw.w1 * r1[tw.i1]);
}

template <typename acc_t>
__device__ inline acc_t combined(const Levels<acc_t>& levels, Reduce reduce, int64_t b, int64_t i, int64_t j,
                                 int64_t out_h, int64_t out_w) {
  acc_t v = upsampled(levels.level[0], b, i, j, out_h, out_w);
  for (int l = 1; l < levels.count; ++l) {
    const acc_t d = upsampled(levels.level[l], b, i, j, out_h, out_w);
    v = reduce == Reduce::Mul ? v * d : v + d;
  }
  return reduce == Reduce::Mean ? v / static_cast<acc_t>(levels.count) : v;
}

__device__ inline int64_t reflect_if_outside(int64_t i, int64_t size) {
  return (i >= 0 && i < size) ? i : reflect_index(i, size);
}

// sum_k taps[k] * src[reflect(center + k - radius) * stride]
template <typename acc_t>
__device__ inline acc_t blur_at(const acc_t* src, int64_t stride, int64_t center, int64_t size,
                                const acc_t* __restrict__ taps, int64_t radius) {
  acc_t acc = 0;
  for (int64_t k = 0; k <= 2 * radius; ++k) {
    acc += taps[k] * src[reflect_if_outside(center + k - radius, size) * stride];
  }
  return acc;
}

// K2. Block blockIdx.x = b * out_h + i. taps == nullptr: no blur, dst is the output; else dst is tmp.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    combine_rows_kernel(Levels<acc_t> levels, Reduce reduce, int64_t out_h, int64_t out_w,
                        const acc_t* __restrict__ taps, int64_t radius, acc_t* __restrict__ dst) {
  extern __shared__ __align__(sizeof(double)) unsigned char row_bytes[];
  acc_t* row = reinterpret_cast<acc_t*>(row_bytes);
  const int64_t bi = blockIdx.x;
  const int64_t b = bi / out_h;
  const int64_t i = bi % out_h;
  acc_t* dst_row = dst + bi * out_w;
  const bool blur = taps != nullptr;
  for (int64_t j = threadIdx.x; j < out_w; j += blockDim.x) {
    const acc_t v = combined(levels, reduce, b, i, j, out_h, out_w);
    if (blur) {
      row[j] = v;
    } else {
      dst_row[j] = v;
    }
  }
  if (!blur) return;  // uniform over the block
  __syncthreads();
  for (int64_t j = threadIdx.x; j < out_w; j += blockDim.x) {
    dst_row[j] = blur_at(row, 1, j, out_w, taps, radius);
  }
}

// K3. One thread per pixel of the flattened [B, out_h, out_w] output.
template <typename acc_t>
__global__ void __launch_bounds__(kBlurThreads)
    vertical_blur_kernel(const acc_t* __restrict__ tmp, int64_t out_h, int64_t out_w, int64_t total,
                         const acc_t* __restrict__ taps, int64_t radius, acc_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t plane = out_h * out_w;
  const int64_t b = idx / plane;
  const int64_t i = (idx % plane) / out_w;
  const int64_t j = idx % out_w;
  out[idx] = blur_at(tmp + b * plane + j, out_w, i, out_h, taps, radius);
}

template <typename scalar_t, typename acc_t>
at::Tensor level_distance(const at::Tensor& t, const at::Tensor& s, cudaStream_t stream) {
  const int64_t batch = t.size(0), channels = t.size(1), height = t.size(2), width = t.size(3);
  at::Tensor dist = at::empty({batch, height, width}, t.options().dtype(anomaly_map_out_dtype(t.scalar_type())));
  const int64_t total = batch * height * width;
  const dim3 block(kPixelsPerBlock, kChannelGroups);
  cosine_distance_kernel<scalar_t, acc_t>
      <<<grid_x(ceil_div(total, kPixelsPerBlock), "anomaly_map: cosine distance"), block, 0, stream>>>(
          t.const_data_ptr<scalar_t>(), strides_of(t), s.const_data_ptr<scalar_t>(), strides_of(s), channels,
          height, width, total, dist.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dist;
}

// Dynamic shared memory of K2 when it blurs: one output row.
template <typename acc_t>
int64_t blur_row_bytes(int64_t out_w) {
  const int64_t bytes = out_w * static_cast<int64_t>(sizeof(acc_t));
  TORCH_CHECK(bytes <= kMaxRowBytes, "dmgrd::anomaly_map (CUDA): the blur keeps one output row of ", out_w,
              " values (", bytes, " bytes) in shared memory, more than the 48 KB limit; out_size width must be <= ",
              kMaxRowBytes / static_cast<int64_t>(sizeof(acc_t)), " for this dtype when sigma > 0");
  return bytes;
}

template <typename acc_t>
void launch_combine_rows(const Levels<acc_t>& levels, Reduce reduce, int64_t batch, int64_t out_h, int64_t out_w,
                         const acc_t* taps, int64_t radius, int64_t row_bytes, acc_t* dst, cudaStream_t stream) {
  combine_rows_kernel<acc_t><<<grid_x(batch * out_h, "anomaly_map: upsample/combine"), kRowThreads, row_bytes, stream>>>(
      levels, reduce, out_h, out_w, taps, radius, dst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_vertical_blur(const acc_t* tmp, int64_t batch, int64_t out_h, int64_t out_w, const acc_t* taps,
                          int64_t radius, acc_t* out, cudaStream_t stream) {
  const int64_t total = batch * out_h * out_w;
  vertical_blur_kernel<acc_t><<<grid_x(ceil_div(total, kBlurThreads), "anomaly_map: vertical blur"), kBlurThreads, 0, stream>>>(
      tmp, out_h, out_w, total, taps, radius, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Gaussian taps as a device tensor of the output dtype; undefined when sigma == 0 (no blur).
at::Tensor device_taps(double sigma, const at::TensorOptions& options) {
  if (sigma == 0) return at::Tensor();
  return at::tensor(gaussian_taps(sigma), at::dtype(at::kDouble)).to(options);
}

template <typename scalar_t>
void anomaly_map_impl(at::TensorList teacher, at::TensorList student, Reduce reduce, double sigma, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = out.size(0), out_h = out.size(2), out_w = out.size(3);
  // Checked and copied before any launch; this blocking copy then does not wait for the kernels.
  const int64_t row_bytes = sigma == 0 ? 0 : blur_row_bytes<acc_t>(out_w);
  const at::Tensor taps = device_taps(sigma, out.options());

  // dists keeps every level's buffer alive until all launches below are queued.
  std::vector<at::Tensor> dists;
  dists.reserve(teacher.size());
  Levels<acc_t> levels{};
  levels.count = static_cast<int>(teacher.size());
  for (size_t l = 0; l < teacher.size(); ++l) {
    dists.push_back(level_distance<scalar_t, acc_t>(teacher[l], student[l], stream));
    const int64_t height = teacher[l].size(2), width = teacher[l].size(3);
    levels.level[l] = {dists.back().const_data_ptr<acc_t>(), height, width,
                       align_corners_scale<acc_t>(height, out_h), align_corners_scale<acc_t>(width, out_w)};
  }

  acc_t* out_ptr = out.mutable_data_ptr<acc_t>();
  if (!taps.defined()) {
    launch_combine_rows<acc_t>(levels, reduce, batch, out_h, out_w, nullptr, 0, 0, out_ptr, stream);
    return;
  }
  const int64_t radius = (taps.numel() - 1) / 2;
  const at::Tensor tmp = at::empty({batch, out_h, out_w}, out.options());
  launch_combine_rows<acc_t>(levels, reduce, batch, out_h, out_w, taps.const_data_ptr<acc_t>(), radius,
                             row_bytes, tmp.mutable_data_ptr<acc_t>(), stream);
  launch_vertical_blur<acc_t>(tmp.const_data_ptr<acc_t>(), batch, out_h, out_w, taps.const_data_ptr<acc_t>(), radius,
                              out_ptr, stream);
}

at::Tensor anomaly_map_cuda(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                            std::string_view reduce_name, double sigma) {
  check_anomaly_map_args(teacher, student, out_size, sigma);
  const Reduce reduce = parse_reduce(std::string(reduce_name));
  TORCH_CHECK(teacher.size() <= static_cast<size_t>(kMaxLevels), "dmgrd::anomaly_map (CUDA): at most ", kMaxLevels,
              " feature levels are supported, got ", teacher.size());
  TORCH_CHECK(teacher[0].is_cuda(), "dmgrd::anomaly_map (CUDA): features must be CUDA tensors, got ",
              teacher[0].device());
  for (size_t l = 0; l < teacher.size(); ++l) {
    TORCH_CHECK(teacher[l].size(2) > 0 && teacher[l].size(3) > 0, "dmgrd::anomaly_map (CUDA): level ", l,
                " has an empty spatial size ", teacher[l].sizes());
  }
  const c10::cuda::CUDAGuard device_guard(teacher[0].device());
  const at::ScalarType in_dtype = teacher[0].scalar_type();
  at::Tensor out = at::empty({teacher[0].size(0), 1, out_size[0], out_size[1]},
                             teacher[0].options().dtype(anomaly_map_out_dtype(in_dtype)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "dmgrd_anomaly_map_cuda",
                                  [&] { anomaly_map_impl<scalar_t>(teacher, student, reduce, sigma, out); });
  return out;
}

}  // namespace
}  // namespace dmgrd::cuda_anomaly_map

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) { m.impl("anomaly_map", &dmgrd::cuda_anomaly_map::anomaly_map_cuda); }
