// Exact k-nearest search of query rows in one or more memory banks on the CPU, shared by dmgrd::memory_nearest
// and dmgrd::dual_memory_margin. The distance matrix is never materialised:
//  - tiled path: each bank is packed once (gemm.h); tasks of (query block, range of bank tiles) run in
//    parallel; each tile's inner products come from gemm::multiply and are consumed at once by a fused
//    norm-add + running top-k pass while they are hot in cache; ranges of one block are merged at the end.
//  - wide path (few queries, few items, huge D, e.g. image-level search): the problem is one tile, so D is
//    split instead: each chunk of columns gives partial products and squared norms in parallel, summed in
//    chunk order, then the same top-k pass runs.
// Every distance is computed the same way whichever task computes it (gemm.h sums in a fixed order, chunks and
// blocks are fixed by the sizes), and the top-k merge keeps the k best under a total order, so the result does
// not depend on the thread count.
// Distances and ranking are those of common.h (item_distance, ranks_before), accumulated in float32 (float64
// for float64 inputs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "gemm.h"

namespace dmgrd {
namespace nearest_cpu {

constexpr int64_t kQueryBlock = 256;     // most queries per task
constexpr int64_t kItemTile = 1024;      // memory items per product tile (a multiple of the panel width)
constexpr int64_t kDepthChunk = 16384;   // columns per partial product on the wide path
constexpr int64_t kWideEntries = 65536;  // the wide path keeps N x (all items) partial products per chunk
constexpr int64_t kParallelWork = 1 << 22;  // multiply-adds below which one thread does the whole search

// dist [banks, N, k] in the accumulation dtype and index [banks, N, k] int64, nearest first.
struct Result {
  at::Tensor dist, index;
};

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `x` with unit column stride (a copy only for column-strided layouts such as a transposed [D, N] tensor).
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
}

// Sums of squares of the rows of `x` (accumulation dtype, unit column stride) into out[0..rows).
template <typename acc_t>
void row_squares(const at::Tensor& x, acc_t* out) {
  const acc_t* base = x.const_data_ptr<acc_t>();
  for (int64_t r = 0; r < x.size(0); ++r) out[r] = gemm::sum_squares(base + r * x.stride(0), x.size(1));
}

// Feeds one query's distances to `count` consecutive items (first index `first`) into its running top-k.
template <Metric metric, typename acc_t>
void scan_items(const acc_t* dots, acc_t query_term, const acc_t* item_terms, int64_t count, int64_t first,
                acc_t* dist, int64_t* index, int64_t k) {
  acc_t worst = dist[k - 1];
  for (int64_t j = 0; j < count; ++j) {
    const acc_t d = item_distance<metric>(dots[j], query_term, item_terms[j]);
    if (!(d > worst)) {  // cheap filter; NaN or a tie goes on to the exact comparison
      topk_push(dist, index, k, d, first + j);
      worst = dist[k - 1];
    }
  }
}

struct Tile {
  int64_t bank, begin, count;
};

template <typename acc_t, Metric metric>
class Search {
 public:
  Search(const at::Tensor& query, at::TensorList banks, int64_t k)
      : query_(unit_column_stride(query.detach())), k_(k), n_(query.size(0)), depth_(query.size(1)) {
    for (const at::Tensor& b : banks) banks_.push_back(unit_column_stride(b.detach()));
    const auto options = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t nb = static_cast<int64_t>(banks_.size());
    result_ = {at::empty({nb, n_, k}, options), at::empty({nb, n_, k}, options.dtype(at::kLong))};
  }

  Result run() {
    if (n_ == 0) return result_;
    int64_t items = 0;
    for (const at::Tensor& b : banks_) items += b.size(0);
    if (n_ * items <= kWideEntries && depth_ >= 2 * kDepthChunk) {
      run_wide(items);
    } else {
      run_tiled();
    }
    return result_;
  }

 private:
  acc_t* out_dist(int64_t bank, int64_t row) { return result_.dist.mutable_data_ptr<acc_t>() + (bank * n_ + row) * k_; }
  int64_t* out_index(int64_t bank, int64_t row) {
    return result_.index.mutable_data_ptr<int64_t>() + (bank * n_ + row) * k_;
  }

  // Each bank packed as gemm panels (converted to the accumulation dtype), in parallel over panels.
  gemm::Packed<acc_t> packed_bank(const at::Tensor& bank) const {
    gemm::Packed<acc_t> packed = gemm::packing<acc_t>(depth_, bank.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "dmgrd_nearest_pack", [&] {
      const scalar_t* src = bank.const_data_ptr<scalar_t>();
      const int64_t panel_size = std::max<int64_t>(1, depth_ * packed.kPanel);
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / panel_size);
      at::parallel_for(0, packed.panels(), grain, [&](int64_t begin, int64_t end) {
        gemm::pack_panels(packed, src, 1, bank.stride(0), begin, end);
      });
    });
    return packed;
  }

  void run_tiled() {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    std::vector<gemm::Packed<acc_t>> items;  // banks packed in the accumulation dtype, with their item terms
    std::vector<std::vector<acc_t>> terms;
    std::vector<Tile> tiles;
    for (size_t b = 0; b < banks_.size(); ++b) {
      items.push_back(packed_bank(banks_[b]));
      const gemm::Packed<acc_t>& bank = items.back();
      terms.emplace_back(bank.panels() * bank.kPanel);
      gemm::column_squares(bank, 0, depth_, terms.back().data());
      for (acc_t& t : terms.back()) t = row_term(metric, t);
      for (int64_t m = 0; m < bank.n; m += kItemTile) {
        tiles.push_back({static_cast<int64_t>(b), m, std::min(kItemTile, bank.n - m)});
      }
    }
    int64_t items_total = 0;
    for (const auto& b : items) items_total += b.n;
    const int64_t threads = n_ * items_total * depth_ < kParallelWork ? 1 : at::get_num_threads();
    const int64_t blocks = (n_ + kQueryBlock - 1) / kQueryBlock;
    const int64_t rows_per_block = (n_ + blocks - 1) / blocks;
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    // Splitting the tiles of a block over threads changes which task finds an item, not its distance.
    const int64_t splits = std::min(ntiles, std::max<int64_t>(1, (threads + blocks - 1) / blocks));
    const int64_t tiles_per_split = (ntiles + splits - 1) / splits;
    const int64_t nb = static_cast<int64_t>(banks_.size());
    // One running top-k per (split, bank, query); split 0 writes straight into the result.
    Result parts = result_;
    if (splits > 1) {
      parts = {at::empty({splits * nb, n_, k_}, result_.dist.options()),
               at::empty({splits * nb, n_, k_}, result_.index.options())};
    }
    acc_t* part_dist = parts.dist.mutable_data_ptr<acc_t>();
    int64_t* part_index = parts.index.mutable_data_ptr<int64_t>();
    const int64_t width = gemm::Packed<acc_t>::kPanel;

    const int64_t tasks = blocks * splits;
    at::parallel_for(0, tasks, threads == 1 ? tasks : 1, [&](int64_t task_begin, int64_t task_end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
      std::vector<acc_t> dots(rows_per_block * kItemTile);
      std::vector<acc_t> query_terms(rows_per_block);
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t block = task / splits, split = task % splits;
        const int64_t r0 = block * rows_per_block, rows = std::min(rows_per_block, n_ - r0);
        const at::Tensor q = query_.narrow(0, r0, rows).to(acc);
        row_squares<acc_t>(q, query_terms.data());
        for (int64_t r = 0; r < rows; ++r) query_terms[r] = row_term(metric, query_terms[r]);
        const gemm::Strided<acc_t> a{q.const_data_ptr<acc_t>(), q.stride(0), 1};
        const int64_t offset = (split * nb * n_ + r0) * k_;
        for (int64_t b = 0; b < nb; ++b) {
          topk_reset(part_dist + offset + b * n_ * k_, part_index + offset + b * n_ * k_, rows * k_);
        }
        const int64_t t_end = std::min(ntiles, (split + 1) * tiles_per_split);
        for (int64_t t = split * tiles_per_split; t < t_end; ++t) {
          const Tile tile = tiles[t];
          const int64_t p0 = tile.begin / width, p1 = (tile.begin + tile.count + width - 1) / width;
          gemm::multiply<acc_t>(rows, a, items[tile.bank], 0, depth_, p0, p1, dots.data(), tile.count, false);
          const int64_t base = offset + tile.bank * n_ * k_;
          for (int64_t r = 0; r < rows; ++r) {
            scan_items<metric>(dots.data() + r * tile.count, query_terms[r], terms[tile.bank].data() + tile.begin,
                               tile.count, tile.begin, part_dist + base + r * k_, part_index + base + r * k_, k_);
          }
        }
      }
    });
    if (splits > 1) merge_splits(parts, splits);
  }

  // result = the k best of every split's list, per (bank, query).
  void merge_splits(const Result& parts, int64_t splits) {
    const int64_t lists = static_cast<int64_t>(banks_.size()) * n_;
    const acc_t* pd = parts.dist.const_data_ptr<acc_t>();
    const int64_t* pi = parts.index.const_data_ptr<int64_t>();
    acc_t* od = result_.dist.mutable_data_ptr<acc_t>();
    int64_t* oi = result_.index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, lists, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t list = begin; list < end; ++list) {
        topk_reset(od + list * k_, oi + list * k_, k_);
        for (int64_t s = 0; s < splits; ++s) {
          for (int64_t j = 0; j < k_; ++j) {
            const int64_t at = (s * lists + list) * k_ + j;
            topk_push(od + list * k_, oi + list * k_, k_, pd[at], pi[at]);
          }
        }
      }
    });
  }

  // Few queries and items, huge D: partial products and squares per column chunk, summed in chunk order.
  void run_wide(int64_t items) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t chunks = (depth_ + kDepthChunk - 1) / kDepthChunk;
    const int64_t per_chunk = n_ * items + n_ + items;  // products [bank][N][M_b], query squares, item squares
    std::vector<acc_t> partial(chunks * per_chunk);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
      for (int64_t c = begin; c < end; ++c) {
        const int64_t c0 = c * kDepthChunk, width = std::min(kDepthChunk, depth_ - c0);
        acc_t* out = partial.data() + c * per_chunk;
        const at::Tensor q = query_.narrow(1, c0, width).to(acc);
        row_squares<acc_t>(q, out + n_ * items);
        acc_t* item_squares = out + n_ * items + n_;
        const gemm::Strided<acc_t> a{q.const_data_ptr<acc_t>(), q.stride(0), 1};
        for (const at::Tensor& bank : banks_) {
          const gemm::Packed<acc_t> m = pack_chunk(bank, c0, width);
          gemm::multiply<acc_t>(n_, a, m, out, m.n);
          gemm::column_squares(m, 0, width, item_squares);
          out += n_ * m.n;
          item_squares += m.n;
        }
      }
    });
    std::vector<acc_t> total(partial.begin(), partial.begin() + per_chunk);
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t i = 0; i < per_chunk; ++i) total[i] += partial[c * per_chunk + i];
    }
    acc_t* terms = total.data() + n_ * items;  // query terms, then every bank's item terms
    for (int64_t i = 0; i < n_ + items; ++i) terms[i] = row_term(metric, terms[i]);
    const acc_t* products = total.data();
    const acc_t* item_terms = terms + n_;
    for (size_t b = 0; b < banks_.size(); ++b) {
      const int64_t count = banks_[b].size(0);
      at::parallel_for(0, n_, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t* dist = out_dist(static_cast<int64_t>(b), r);
          int64_t* index = out_index(static_cast<int64_t>(b), r);
          topk_reset(dist, index, k_);
          scan_items<metric>(products + r * count, terms[r], item_terms, count, 0, dist, index, k_);
        }
      });
      products += n_ * count;
      item_terms += count;
    }
  }

  // Columns [c0, c0 + width) of every item of `bank`, packed as gemm panels.
  static gemm::Packed<acc_t> pack_chunk(const at::Tensor& bank, int64_t c0, int64_t width) {
    gemm::Packed<acc_t> packed;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "dmgrd_nearest_pack", [&] {
      packed = gemm::pack<acc_t>(bank.const_data_ptr<scalar_t>() + c0, width, bank.size(0), 1, bank.stride(0));
    });
    return packed;
  }

  at::Tensor query_;
  std::vector<at::Tensor> banks_;
  int64_t k_, n_, depth_;
  Result result_;
};

// Nearest k items of every query row in each bank (all banks share query's dtype and D).
inline Result search(const at::Tensor& query, at::TensorList banks, int64_t k, Metric metric) {
  Result result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dmgrd_nearest_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (metric == Metric::L2) {
      result = Search<acc_t, Metric::L2>(query, banks, k).run();
    } else {
      result = Search<acc_t, Metric::Cosine>(query, banks, k).run();
    }
  });
  return result;
}

}  // namespace nearest_cpu
}  // namespace dmgrd
