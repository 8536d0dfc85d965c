// Matrix products of the CPU kernels whose results never depend on the thread count.
//
// BLAS libraries (MKL, OpenBLAS) split the inner dimension of small products across their threads, so
// at::mm rounds differently at 1 and at 4 threads. Here every element C[i, j] is summed over k in ascending
// order in one accumulator (k-blocks continue from the stored partial sum, which is the same chain of
// operations), so the result depends only on the operands and the instruction set, never on the tiling, the
// caller's parallel split or the thread count. Nothing here starts threads: callers split rows or panels.
//
// B is packed once into panels of kPanel columns (one 64-byte vector), [k][kPanel] each, zero-padded past n:
// the layout the register tile streams; A is read in place through its two strides, so A or its transpose can
// be used. On x86-64 the loops are compiled for AVX-512 (12-row tiles), AVX2 + FMA (6 rows) and the baseline
// (4 rows), chosen once from the CPU; rows are independent, so the tile height never changes a result, and
// the AVX-512 and AVX2 versions, which both fuse multiply-adds, give the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DMGRD_GEMM_X86 1
#endif

namespace dmgrd {
namespace gemm {

// A vector of `bytes` bytes of T (32 for AVX2, 64 for AVX-512 registers).
template <typename T, int bytes>
struct Simd {
  typedef T vec __attribute__((vector_size(bytes)));
  static constexpr int kLanes = bytes / sizeof(T);
};

constexpr int64_t kDepth = 256;  // k per block: a panel block stays in L1 while the rows stream past

template <typename T>
constexpr int64_t panel_width() {
  return 64 / sizeof(T);
}

// B [k, n] packed as ceil(n / kPanel) panels of [k][kPanel].
template <typename T>
struct Packed {
  std::vector<T> data;
  int64_t k = 0, n = 0;

  static constexpr int64_t kPanel = panel_width<T>();
  int64_t panels() const { return (n + kPanel - 1) / kPanel; }
  const T* panel(int64_t p) const { return data.data() + p * k * kPanel; }
};

// An empty packing of a [k, n] matrix: fill its panels with pack_panels.
template <typename T>
Packed<T> packing(int64_t k, int64_t n) {
  Packed<T> out;
  out.k = k;
  out.n = n;
  out.data.assign(out.panels() * k * Packed<T>::kPanel, T(0));
  return out;
}

// Packs panels [p0, p1) of `out` from element (kk, j) = src[kk * k_stride + j * n_stride] of a [k, n] matrix,
// converted to T. Pass the strides of B [k, n] row-major (n_stride 1) or of B' [n, k] row-major (k_stride 1)
// for a product with B'^T. Panels are independent: callers may pack ranges of them in parallel.
template <typename T, typename S>
void pack_panels(Packed<T>& out, const S* src, int64_t k_stride, int64_t n_stride, int64_t p0, int64_t p1) {
  constexpr int64_t width = Packed<T>::kPanel;
  for (int64_t p = p0; p < p1; ++p) {
    T* dst = out.data.data() + p * out.k * width;
    const int64_t cols = std::min(width, out.n - p * width);
    for (int64_t j = 0; j < cols; ++j) {
      const S* column = src + (p * width + j) * n_stride;
      for (int64_t kk = 0; kk < out.k; ++kk) dst[kk * width + j] = static_cast<T>(column[kk * k_stride]);
    }
  }
}

// Sum of squares of n values, eight independent accumulators so the compiler can vectorise.
template <typename acc_t>
acc_t sum_squares(const acc_t* x, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) part[u] += x[j + u] * x[j + u];
  }
  for (; j < n; ++j) part[0] += x[j] * x[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The whole [k, n] matrix packed on the calling thread.
template <typename T, typename S>
Packed<T> pack(const S* src, int64_t k, int64_t n, int64_t k_stride, int64_t n_stride) {
  Packed<T> out = packing<T>(k, n);
  pack_panels(out, src, k_stride, n_stride, 0, out.panels());
  return out;
}

// Per packed column j, the sum of squares of rows [k0, k0 + k) in ascending order, into out[0..n).
template <typename T>
void column_squares(const Packed<T>& b, int64_t k0, int64_t k, T* out) {
  constexpr int64_t width = Packed<T>::kPanel;
  for (int64_t p = 0; p < b.panels(); ++p) {
    T sums[width] = {};
    const T* block = b.panel(p) + k0 * width;
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = 0; j < width; ++j) sums[j] += block[kk * width + j] * block[kk * width + j];
    }
    std::memcpy(out + p * width, sums, std::min(width, b.n - p * width) * sizeof(T));
  }
}

// A [m, k] with element (i, kk) at data[i * row_stride + kk * col_stride].
template <typename T>
struct Strided {
  const T* data;
  int64_t row_stride, col_stride;
};

// The first `count` elements of a vector from / to memory (fixed-size copies keep the vector in registers).
template <typename V, typename T>
inline __attribute__((always_inline)) V load_vector(const T* src, int64_t count) {
  V v;
  if (count == int64_t(sizeof(V) / sizeof(T))) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    T buffer[sizeof(V) / sizeof(T)] = {};
    std::memcpy(buffer, src, count * sizeof(T));
    std::memcpy(&v, buffer, sizeof(v));
  }
  return v;
}

template <typename V, typename T>
inline __attribute__((always_inline)) void store_vector(const V& v, T* dst, int64_t count) {
  if (count == int64_t(sizeof(V) / sizeof(T))) {
    std::memcpy(dst, &v, sizeof(v));
  } else if (count > 0) {
    T buffer[sizeof(V) / sizeof(T)];
    std::memcpy(buffer, &v, sizeof(v));
    std::memcpy(dst, buffer, count * sizeof(T));
  }
}

// C tile [rows, cols] (+)= A rows [rows, depth] * panel block [depth][kPanel]; cols <= kPanel. Each row of the
// panel is `parts` vectors of `bytes` bytes.
template <typename T, int rows, int bytes>
inline __attribute__((always_inline)) void tile(const T* a, int64_t a_rs, int64_t a_cs, const T* panel,
                                                int64_t depth, T* c, int64_t ldc, int64_t cols, bool load) {
  using vec = typename Simd<T, bytes>::vec;
  constexpr int lanes = Simd<T, bytes>::kLanes;
  constexpr int parts = panel_width<T>() / lanes;
  int64_t part_cols[parts];  // valid columns of each part
  for (int v = 0; v < parts; ++v) part_cols[v] = std::clamp<int64_t>(cols - v * lanes, 0, lanes);
  vec acc[rows][parts];
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < parts; ++v) acc[r][v] = load ? load_vector<vec>(c + r * ldc + v * lanes, part_cols[v]) : vec{};
  }
  for (int64_t kk = 0; kk < depth; ++kk) {
    vec b[parts];
    for (int v = 0; v < parts; ++v) std::memcpy(&b[v], panel + kk * panel_width<T>() + v * lanes, sizeof(vec));
    for (int r = 0; r < rows; ++r) {
      const T x = a[r * a_rs + kk * a_cs];
      for (int v = 0; v < parts; ++v) acc[r][v] += x * b[v];
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < parts; ++v) store_vector(acc[r][v], c + r * ldc + v * lanes, part_cols[v]);
  }
}

template <typename T, int rows, int bytes>
inline __attribute__((always_inline)) void tile_up_to(int count, const T* a, int64_t a_rs, int64_t a_cs,
                                                      const T* panel, int64_t depth, T* c, int64_t ldc,
                                                      int64_t cols, bool load) {
  if constexpr (rows > 1) {
    if (count < rows) return tile_up_to<T, rows - 1, bytes>(count, a, a_rs, a_cs, panel, depth, c, ldc, cols, load);
  }
  tile<T, rows, bytes>(a, a_rs, a_cs, panel, depth, c, ldc, cols, load);
}

// C [m, cols of panels p0..p1) (row-major, ldc; column 0 of C is column p0 * kPanel of B) = A [m, k0:k0+k] *
// B [k0:k0+k, those columns], or += with `accumulate`, in register tiles of up to `rows` rows.
template <typename T, int rows, int bytes>
inline __attribute__((always_inline)) void multiply_tiles(int64_t m, Strided<T> a, const Packed<T>& b, int64_t k0,
                                                          int64_t k, int64_t p0, int64_t p1, T* c, int64_t ldc,
                                                          bool accumulate) {
  constexpr int64_t width = Packed<T>::kPanel;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(width, b.n - p * width);
    T* c_panel = c + (p - p0) * width;
    for (int64_t d0 = 0; d0 < k; d0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - d0);
      const T* block = b.panel(p) + (k0 + d0) * width;
      const bool load = accumulate || d0 > 0;
      for (int64_t i = 0; i < m; i += rows) {
        const int count = static_cast<int>(std::min<int64_t>(rows, m - i));
        tile_up_to<T, rows, bytes>(count, a.data + i * a.row_stride + d0 * a.col_stride, a.row_stride, a.col_stride,
                            block, depth, c_panel + i * ldc, ldc, cols, load);
      }
    }
  }
}

#ifdef DMGRD_GEMM_X86
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void multiply_avx512(int64_t m, Strided<T> a, const Packed<T>& b,
                                                                 int64_t k0, int64_t k, int64_t p0, int64_t p1,
                                                                 T* c, int64_t ldc, bool accumulate) {
  multiply_tiles<T, 12, 64>(m, a, b, k0, k, p0, p1, c, ldc, accumulate);
}

template <typename T>
__attribute__((target("arch=x86-64-v3"))) void multiply_avx2(int64_t m, Strided<T> a, const Packed<T>& b,
                                                               int64_t k0, int64_t k, int64_t p0, int64_t p1,
                                                               T* c, int64_t ldc, bool accumulate) {
  multiply_tiles<T, 6, 32>(m, a, b, k0, k, p0, p1, c, ldc, accumulate);
}

// 2: AVX-512 (x86-64-v4), 1: AVX2 + FMA (x86-64-v3), 0: neither.
inline int x86_level() {
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
  return level;
}
#endif

// C [m, cols of panels p0..p1) (row-major, ldc; column 0 of C is column p0 * kPanel of B) = A [m, k0:k0+k] *
// B [k0:k0+k, those columns], or += with `accumulate`. `a` points at A's column k0.
template <typename T>
void multiply(int64_t m, Strided<T> a, const Packed<T>& b, int64_t k0, int64_t k, int64_t p0, int64_t p1, T* c,
              int64_t ldc, bool accumulate) {
#ifdef DMGRD_GEMM_X86
  switch (x86_level()) {
    case 2: return multiply_avx512<T>(m, a, b, k0, k, p0, p1, c, ldc, accumulate);
    case 1: return multiply_avx2<T>(m, a, b, k0, k, p0, p1, c, ldc, accumulate);
    default: break;
  }
#endif
  multiply_tiles<T, 4, 16>(m, a, b, k0, k, p0, p1, c, ldc, accumulate);
}

// C [m, n] = A [m, k] * B (all of the packed B), or += with `accumulate`.
template <typename T>
void multiply(int64_t m, Strided<T> a, const Packed<T>& b, T* c, int64_t ldc, bool accumulate = false) {
  multiply<T>(m, a, b, 0, b.k, 0, b.panels(), c, ldc, accumulate);
}

}  // namespace gemm
}  // namespace dmgrd
