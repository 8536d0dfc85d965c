// Fresh CPU outputs backed by transparent huge pages.
#pragma once

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdint>

namespace dmgrd {

// Asks the kernel to back the 2 MiB-aligned interior of t's memory with transparent huge pages before it is
// first written, as PyTorch does for every allocation under THP_MEM_ALLOC_ENABLE=1. A fresh output of tens of
// MB then takes one page fault per 2 MiB instead of one per 4 KiB, which otherwise costs a memory-bound kernel
// more than its arithmetic. Small tensors, and systems without THP, are left as they are. Returns t.
inline at::Tensor with_huge_pages(at::Tensor t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (t.nbytes() >= kHugePage) {
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace dmgrd
