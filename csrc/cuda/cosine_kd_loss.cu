// CUDA kernels of dmgrd::cosine_kd_loss_forward / _backward. Every level goes into one launch per step
// (a table of up to kMaxLevels levels; each block finds its level), and every sum has a fixed order:
//   flatten forward: K1 sums <t, s>, |t|^2, |s|^2 over a kChunk-element chunk of one image's vector per block;
//     K2 (one block, a warp per row) combines each row's chunks, writes its coefficients and adds the terms.
//   pixel forward: K1 sums over channels per pixel (contiguous layout: 32 pixels x 8 channel groups per block;
//     channels_last: a warp per pixel, 8 pixels per block), writes the pixels' coefficients and one partial
//     term per block; K2 (one block) adds the partials.
//   backward: K1's tiling again, applying the coefficients instead of summing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "../cosine_kd_loss.h"
#include "launch.cuh"

namespace dmgrd::cuda_cosine_kd_loss {
namespace {

constexpr int kMaxLevels = 8;
constexpr int kWarp = 32;
constexpr int kGroups = 8;  // blockDim = (kWarp, kGroups) for every kernel
constexpr int kThreads = kWarp * kGroups;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kChunk = 8192;  // flatten: elements per block
constexpr int kPackBytes = 16;    // vector loads and stores of the flatten kernels

template <typename scalar_t>
struct Table {
  const scalar_t* t[kMaxLevels];
  const scalar_t* s[kMaxLevels];
  scalar_t* gs[kMaxLevels];
  scalar_t* gt[kMaxLevels];  // nullptr: no teacher gradient
  int64_t channels[kMaxLevels];
  int64_t pixels[kMaxLevels];
  int64_t pieces[kMaxLevels];           // blocks per image: chunks (flatten) or pixel tiles (pixel)
  int64_t block_begin[kMaxLevels + 1];  // first block of each level; [count] = all blocks
  int64_t row_begin[kMaxLevels];        // first coefficient row of each level
  bool channels_last[kMaxLevels];
  int64_t batch;
  int count;
};

// Block `block` of a launch over the table: its level, image and piece (chunk or pixel tile) of that image.
struct Place {
  int level;
  int64_t b, piece;
};

template <typename scalar_t>
__device__ inline Place place_of(const Table<scalar_t>& tab, int64_t block) {
  int l = 0;
  while (l + 1 < tab.count && block >= tab.block_begin[l + 1]) ++l;
  const int64_t local = block - tab.block_begin[l];
  return {l, local / tab.pieces[l], local % tab.pieces[l]};
}

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums of a, b, c over the block's kThreads threads, valid in thread 0.
template <typename acc_t>
__device__ inline void block_sum3(acc_t& a, acc_t& b, acc_t& c) {
  __shared__ acc_t shared[3][kWarps];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? shared[0][lane] : acc_t(0));
    b = warp_sum(lane < kWarps ? shared[1][lane] : acc_t(0));
    c = warp_sum(lane < kWarps ? shared[2][lane] : acc_t(0));
  }
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <int kVec, typename scalar_t>
__device__ inline Pack<scalar_t, kVec> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(p);
}

// Flatten: elements [begin, end) of image b's vector handled by this block.
struct Span {
  int64_t offset, begin, end;
};

template <typename scalar_t>
__device__ inline Span flat_span(const Table<scalar_t>& tab, const Place& pos) {
  const int64_t len = tab.channels[pos.level] * tab.pixels[pos.level];
  const int64_t begin = pos.piece * kChunk;
  return {pos.b * len, begin, begin + kChunk < len ? begin + kChunk : len};
}

// Flatten K1. kVec elements per load; kVec > 1 only when every row length is a multiple of kVec and every
// pointer is aligned to kPackBytes (checked on the host).
template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kThreads) flat_sums_kernel(Table<scalar_t> tab, acc_t* __restrict__ partials) {
  const int64_t block = blockIdx.x;
  const Place pos = place_of(tab, block);
  const Span span = flat_span(tab, pos);
  const scalar_t* t = tab.t[pos.level] + span.offset;
  const scalar_t* s = tab.s[pos.level] + span.offset;
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  acc_t dot = 0, tt = 0, ss = 0;
  for (int64_t i = span.begin + static_cast<int64_t>(tid) * kVec; i < span.end; i += kThreads * kVec) {
    const Pack<scalar_t, kVec> tv = load_pack<kVec>(t + i);
    const Pack<scalar_t, kVec> sv = load_pack<kVec>(s + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t x = static_cast<acc_t>(tv.v[k]), y = static_cast<acc_t>(sv.v[k]);
      dot += x * y;
      tt += x * x;
      ss += y * y;
    }
  }
  block_sum3(dot, tt, ss);
  if (tid == 0) {
    partials[3 * block] = dot;
    partials[3 * block + 1] = tt;
    partials[3 * block + 2] = ss;
  }
}

// Flatten K2, one block: warp w combines rows w, w + kWarps, ... (row r = level * batch + b).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    flat_rows_kernel(Table<scalar_t> tab, const acc_t* __restrict__ partials, acc_t* __restrict__ coeffs,
                     acc_t* __restrict__ loss) {
  __shared__ acc_t totals[kWarps];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(tab.batch);
  acc_t total = 0;
  for (int64_t r = warp; r < tab.count * tab.batch; r += kWarps) {
    const int l = static_cast<int>(r / tab.batch);
    const int64_t b = r % tab.batch;
    const acc_t* p = partials + 3 * (tab.block_begin[l] + b * tab.pieces[l]);
    acc_t dot = 0, tt = 0, ss = 0;
    for (int64_t k = lane; k < tab.pieces[l]; k += kWarp) {
      dot += p[3 * k];
      tt += p[3 * k + 1];
      ss += p[3 * k + 2];
    }
    dot = warp_sum(dot);
    tt = warp_sum(tt);
    ss = warp_sum(ss);
    if (lane == 0) total += kd::row_term(dot, tt, ss, inv_count, coeffs + 3 * r);
  }
  if (lane == 0) totals[warp] = total;
  __syncthreads();
  if (lane == 0 && warp == 0) {
    acc_t sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += totals[w];
    *loss = sum;
  }
}

// Pixels per block of the pixel kernels: one per lane (contiguous layout) or one per warp (channels_last).
__host__ __device__ inline int64_t tile_pixels(bool channels_last) { return channels_last ? kGroups : kWarp; }

// A thread of the pixel kernels: its pixel p (of image b at its level) and the channels it walks. Contiguous
// layout: lane x = pixel, y = channel group; channels_last: warp y = pixel, lane x = channel group.
struct PixelThread {
  int level;
  bool channels_last;
  int64_t channels, pixels, p, row, image, pixel_step, channel_step;
  int group, groups;

  // Offset of channel c of the thread's pixel in the level's features.
  __device__ int64_t offset(int64_t c) const { return image + p * pixel_step + c * channel_step; }
};

template <typename scalar_t>
__device__ inline PixelThread pixel_thread(const Table<scalar_t>& tab) {
  const Place pos = place_of(tab, blockIdx.x);
  const int l = pos.level;
  const bool cl = tab.channels_last[l];
  const int64_t channels = tab.channels[l], pixels = tab.pixels[l];
  const int64_t p = pos.piece * tile_pixels(cl) + (cl ? threadIdx.y : threadIdx.x);
  return {l,
          cl,
          channels,
          pixels,
          p,
          tab.row_begin[l] + pos.b * pixels + p,
          pos.b * channels * pixels,
          cl ? channels : 1,
          cl ? 1 : pixels,
          static_cast<int>(cl ? threadIdx.x : threadIdx.y),
          cl ? kWarp : kGroups};
}

// Pixel K1: per-pixel sums, coefficients and the block's partial term.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pixel_sums_kernel(Table<scalar_t> tab, acc_t* __restrict__ coeffs, acc_t* __restrict__ partials) {
  __shared__ acc_t part[3][kGroups][kWarp];
  const int x = threadIdx.x, y = threadIdx.y;
  const PixelThread th = pixel_thread(tab);
  const scalar_t* t = tab.t[th.level];
  const scalar_t* s = tab.s[th.level];
  acc_t dot = 0, tt = 0, ss = 0;
  const bool exists = th.p < th.pixels;
  if (exists) {
    for (int64_t c = th.group; c < th.channels; c += th.groups) {
      const int64_t offset = th.offset(c);
      const acc_t a = static_cast<acc_t>(t[offset]), b = static_cast<acc_t>(s[offset]);
      dot += a * b;
      tt += a * a;
      ss += b * b;
    }
  }
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(tab.batch * th.pixels);
  acc_t* row_coeffs = coeffs + 3 * th.row;
  acc_t term = 0;
  if (th.channels_last) {
    dot = warp_sum(dot);
    tt = warp_sum(tt);
    ss = warp_sum(ss);
    if (x == 0) part[0][y][0] = exists ? kd::row_term(dot, tt, ss, inv_count, row_coeffs) : acc_t(0);
    __syncthreads();
    if (x == 0 && y == 0) {
      for (int w = 0; w < kGroups; ++w) term += part[0][w][0];
    }
  } else {
    part[0][y][x] = dot;
    part[1][y][x] = tt;
    part[2][y][x] = ss;
    __syncthreads();
    if (y == 0) {
      for (int g = 1; g < kGroups; ++g) {
        dot += part[0][g][x];
        tt += part[1][g][x];
        ss += part[2][g][x];
      }
      term = warp_sum(exists ? kd::row_term(dot, tt, ss, inv_count, row_coeffs) : acc_t(0));
    }
  }
  if (x == 0 && y == 0) partials[blockIdx.x] = term;
}

// One block: out = the sum of values[0, n) in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_kernel(const acc_t* __restrict__ values, int64_t n, acc_t* out) {
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  acc_t v = 0, unused_b = 0, unused_c = 0;
  for (int64_t i = tid; i < n; i += kThreads) v += values[i];
  block_sum3(v, unused_b, unused_c);
  if (tid == 0) *out = v;
}

// The row's coefficients times the incoming gradient g: (a, b_s, b_t).
template <typename acc_t>
struct Scaled {
  acc_t a, b_s, b_t;
  __device__ Scaled(const acc_t* c, acc_t g) : a(g * c[0]), b_s(g * c[1]), b_t(g * c[2]) {}
};

// Flatten backward: the chunks of K1, gs = a t + b_s s and gt = a s + b_t t.
template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    flat_grad_kernel(Table<scalar_t> tab, const acc_t* __restrict__ coeffs, const acc_t* __restrict__ grad) {
  const Place pos = place_of(tab, blockIdx.x);
  const Span span = flat_span(tab, pos);
  const int l = pos.level;
  const Scaled<acc_t> c(coeffs + 3 * (tab.row_begin[l] + pos.b), *grad);
  const scalar_t* t = tab.t[l] + span.offset;
  const scalar_t* s = tab.s[l] + span.offset;
  scalar_t* gs = tab.gs[l] + span.offset;
  scalar_t* gt = tab.gt[l] == nullptr ? nullptr : tab.gt[l] + span.offset;
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  for (int64_t i = span.begin + static_cast<int64_t>(tid) * kVec; i < span.end; i += kThreads * kVec) {
    const Pack<scalar_t, kVec> tv = load_pack<kVec>(t + i);
    const Pack<scalar_t, kVec> sv = load_pack<kVec>(s + i);
    Pack<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.v[k] = static_cast<scalar_t>(c.a * static_cast<acc_t>(tv.v[k]) + c.b_s * static_cast<acc_t>(sv.v[k]));
    }
    *reinterpret_cast<Pack<scalar_t, kVec>*>(gs + i) = out;
    if (gt == nullptr) continue;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.v[k] = static_cast<scalar_t>(c.a * static_cast<acc_t>(sv.v[k]) + c.b_t * static_cast<acc_t>(tv.v[k]));
    }
    *reinterpret_cast<Pack<scalar_t, kVec>*>(gt + i) = out;
  }
}

// Pixel backward: the tiles of the pixel K1, one pixel's coefficients per thread.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pixel_grad_kernel(Table<scalar_t> tab, const acc_t* __restrict__ coeffs, const acc_t* __restrict__ grad) {
  const PixelThread th = pixel_thread(tab);
  if (th.p >= th.pixels) return;
  const Scaled<acc_t> c(coeffs + 3 * th.row, *grad);
  const scalar_t* t = tab.t[th.level];
  const scalar_t* s = tab.s[th.level];
  scalar_t* gs = tab.gs[th.level];
  scalar_t* gt = tab.gt[th.level];
  for (int64_t ch = th.group; ch < th.channels; ch += th.groups) {
    const int64_t offset = th.offset(ch);
    const acc_t a = static_cast<acc_t>(t[offset]), b = static_cast<acc_t>(s[offset]);
    gs[offset] = static_cast<scalar_t>(c.a * a + c.b_s * b);
    if (gt != nullptr) gt[offset] = static_cast<scalar_t>(c.a * b + c.b_t * a);
  }
}

std::vector<kd::DenseLevel> checked_levels(at::TensorList teacher, at::TensorList student) {
  kd::check_features(teacher, student);
  TORCH_CHECK(teacher.size() <= static_cast<size_t>(kMaxLevels), "dmgrd::cosine_kd_loss (CUDA): at most ",
              kMaxLevels, " feature levels are supported, got ", teacher.size());
  TORCH_CHECK(teacher[0].is_cuda(), "dmgrd::cosine_kd_loss (CUDA): features must be CUDA tensors, got ",
              teacher[0].device());
  std::vector<kd::DenseLevel> levels;
  for (size_t l = 0; l < teacher.size(); ++l) levels.push_back(kd::dense_level(teacher[l], student[l]));
  return levels;
}

// The launch table; gradient pointers stay null unless grads_s (and grads_t) are given.
template <typename scalar_t>
Table<scalar_t> make_table(const std::vector<kd::DenseLevel>& levels, bool pixel,
                           const std::vector<at::Tensor>* grads_s = nullptr,
                           const std::vector<at::Tensor>* grads_t = nullptr) {
  Table<scalar_t> tab{};
  tab.count = static_cast<int>(levels.size());
  tab.batch = levels[0].t.size(0);
  for (int l = 0; l < tab.count; ++l) {
    const kd::DenseLevel& lv = levels[l];
    tab.t[l] = lv.t.const_data_ptr<scalar_t>();
    tab.s[l] = lv.s.const_data_ptr<scalar_t>();
    tab.gs[l] = grads_s ? (*grads_s)[l].mutable_data_ptr<scalar_t>() : nullptr;
    tab.gt[l] = grads_t && !grads_t->empty() ? (*grads_t)[l].mutable_data_ptr<scalar_t>() : nullptr;
    tab.channels[l] = lv.t.size(1);
    tab.pixels[l] = lv.t.size(2) * lv.t.size(3);
    tab.channels_last[l] = lv.channels_last;
    tab.pieces[l] = pixel ? ceil_div(tab.pixels[l], tile_pixels(lv.channels_last))
                          : ceil_div(tab.channels[l] * tab.pixels[l], kChunk);
    tab.block_begin[l + 1] = tab.block_begin[l] + tab.batch * tab.pieces[l];
    const int64_t rows = pixel ? tab.batch * tab.pixels[l] : tab.batch;
    if (l + 1 < kMaxLevels) tab.row_begin[l + 1] = tab.row_begin[l] + rows;
  }
  return tab;
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0; }

// Whether the flatten kernels may move kPackBytes at a time.
template <typename scalar_t>
bool packable(const Table<scalar_t>& tab) {
  constexpr int64_t vec = kPackBytes / sizeof(scalar_t);
  for (int l = 0; l < tab.count; ++l) {
    const bool grads_ok = (tab.gs[l] == nullptr || aligned(tab.gs[l])) && (tab.gt[l] == nullptr || aligned(tab.gt[l]));
    if ((tab.channels[l] * tab.pixels[l]) % vec != 0 || !aligned(tab.t[l]) || !aligned(tab.s[l]) || !grads_ok) {
      return false;
    }
  }
  return true;
}

template <typename scalar_t, typename acc_t>
void forward_impl(const Table<scalar_t>& tab, bool pixel, at::Tensor& loss, at::Tensor& coeffs) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kWarp, kGroups);
  const int64_t blocks = tab.block_begin[tab.count];
  at::Tensor partials = at::empty({blocks * (pixel ? 1 : 3)}, coeffs.options());
  acc_t* part = partials.mutable_data_ptr<acc_t>();
  acc_t* c = coeffs.mutable_data_ptr<acc_t>();
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  if (pixel) {
    pixel_sums_kernel<scalar_t, acc_t><<<grid_x(blocks, "cosine_kd_loss"), block, 0, stream>>>(tab, c, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_kernel<acc_t><<<1, block, 0, stream>>>(part, blocks, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int vec = kPackBytes / sizeof(scalar_t);
  if (packable(tab)) {
    flat_sums_kernel<scalar_t, acc_t, vec><<<grid_x(blocks, "cosine_kd_loss"), block, 0, stream>>>(tab, part);
  } else {
    flat_sums_kernel<scalar_t, acc_t, 1><<<grid_x(blocks, "cosine_kd_loss"), block, 0, stream>>>(tab, part);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  flat_rows_kernel<scalar_t, acc_t><<<1, block, 0, stream>>>(tab, part, c, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> cosine_kd_loss_forward_cuda(at::TensorList teacher, at::TensorList student,
                                                               std::string_view reduction) {
  const std::vector<kd::DenseLevel> levels = checked_levels(teacher, student);
  const bool pixel = kd::parse_pixel(std::string(reduction));
  const c10::cuda::CUDAGuard device_guard(teacher[0].device());
  const auto options = teacher[0].options().dtype(kd::acc_dtype(teacher[0].scalar_type()));
  at::Tensor coeffs = at::empty({kd::num_rows(teacher, pixel), 3}, options);
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher[0].scalar_type(), "dmgrd_cosine_kd_loss_cuda", [&] {
    forward_impl<scalar_t, at::opmath_type<scalar_t>>(make_table<scalar_t>(levels, pixel), pixel, loss, coeffs);
  });
  return {loss, coeffs};
}

template <typename scalar_t, typename acc_t>
void backward_impl(const Table<scalar_t>& tab, bool pixel, const at::Tensor& coeffs, const at::Tensor& grad) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kWarp, kGroups);
  const unsigned int blocks = grid_x(tab.block_begin[tab.count], "cosine_kd_loss");
  const acc_t* c = coeffs.const_data_ptr<acc_t>();
  const acc_t* g = grad.const_data_ptr<acc_t>();
  constexpr int vec = kPackBytes / sizeof(scalar_t);
  if (pixel) {
    pixel_grad_kernel<scalar_t, acc_t><<<blocks, block, 0, stream>>>(tab, c, g);
  } else if (packable(tab)) {
    flat_grad_kernel<scalar_t, acc_t, vec><<<blocks, block, 0, stream>>>(tab, c, g);
  } else {
    flat_grad_kernel<scalar_t, acc_t, 1><<<blocks, block, 0, stream>>>(tab, c, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cosine_kd_loss_backward_cuda(
    const at::Tensor& grad, at::TensorList teacher, at::TensorList student, const at::Tensor& coeffs,
    std::string_view reduction, bool teacher_grad) {
  const std::vector<kd::DenseLevel> levels = checked_levels(teacher, student);
  const bool pixel = kd::parse_pixel(std::string(reduction));
  const at::ScalarType acc = kd::acc_dtype(teacher[0].scalar_type());
  TORCH_CHECK(coeffs.scalar_type() == acc && coeffs.is_contiguous() && coeffs.device() == teacher[0].device() &&
                  coeffs.numel() == 3 * kd::num_rows(teacher, pixel),
              "dmgrd::cosine_kd_loss_backward: coeffs must be the forward pass's contiguous [rows, 3] ", acc,
              " tensor on the features' device");
  const c10::cuda::CUDAGuard device_guard(teacher[0].device());
  const at::Tensor g = grad.to(coeffs.options()).contiguous();
  std::vector<at::Tensor> grads_s, grads_t;
  for (size_t l = 0; l < levels.size(); ++l) {
    grads_s.push_back(kd::empty_grad(levels[l], student[l]));
    if (teacher_grad) grads_t.push_back(kd::empty_grad(levels[l], teacher[l]));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher[0].scalar_type(), "dmgrd_cosine_kd_loss_bwd_cuda", [&] {
    backward_impl<scalar_t, at::opmath_type<scalar_t>>(make_table<scalar_t>(levels, pixel, &grads_s, &grads_t),
                                                        pixel, coeffs, g);
  });
  return {grads_s, grads_t};
}

}  // namespace
}  // namespace dmgrd::cuda_cosine_kd_loss

TORCH_LIBRARY_IMPL(dmgrd, CUDA, m) {
  m.impl("cosine_kd_loss_forward", &dmgrd::cuda_cosine_kd_loss::cosine_kd_loss_forward_cuda);
  m.impl("cosine_kd_loss_backward", &dmgrd::cuda_cosine_kd_loss::cosine_kd_loss_backward_cuda);
}
