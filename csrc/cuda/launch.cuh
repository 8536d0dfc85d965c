// Launch arithmetic shared by the CUDA kernels: block counts, checked grid sizes and 4-D strides.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace dmgrd {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid's x size: 1 to 2^31 - 1 blocks. `what` names the op and launch in the error.
inline unsigned int grid_x(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), "dmgrd::", what, " (CUDA) needs ",
              blocks, " blocks along x, outside the supported range [1, 2^31 - 1]");
  return static_cast<unsigned int>(blocks);
}

// A grid's y or z size: 1 to 65535 blocks.
inline unsigned int grid_yz(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= 65535, "dmgrd::", what, " (CUDA) needs ", blocks,
              " blocks along y/z, outside the supported range [1, 65535]");
  return static_cast<unsigned int>(blocks);
}

struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

}  // namespace dmgrd
