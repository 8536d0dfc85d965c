// CPU kernels of dmgrd::memory_readout and its backward, flash-attention style: blocks of queries run in
// parallel; each meets the bank tile by tile. The queries scaled by 1 / (|q| T) times the normalised bank tile
// (one BLAS product, at::mm) are the scores; the online softmax (running max and sum) uses ATen's vectorised
// elementwise ops on these cache-sized tiles, the backward's dS = P (dP - rowsum(dO * O)) one fused loop. Backward
// recomputes P from the saved logsumexp; each parallel chunk sums its bank gradient privately and the chunks
// are added at the end (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../common.h"

namespace dmgrd {
namespace {

constexpr int64_t kBankTile = 256;
constexpr int64_t kTileScores = 128 * kBankTile;  // scores per (query block, bank tile): fits in L2 with its kin
constexpr int64_t kMinBlockWork = 1 << 20;        // multiply-adds of a block worth a thread of its own

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Queries per block: one block per thread unless blocks would do little work, at most kTileScores per tile.
int64_t block_rows(int64_t n, int64_t items, int64_t dim) {
  const int64_t per_thread = std::max(ceil_div(n, at::get_num_threads()), ceil_div(kMinBlockWork, items * dim));
  return std::min(per_thread, kTileScores / std::min(items, kBankTile));
}

// The bank in the accumulation dtype: raw values, keys m_j / |m_j| and the inverse norms.
struct Bank {
  at::Tensor values, keys;  // [M, D], contiguous
  InverseNorms norms;

  Bank(const at::Tensor& bank, at::ScalarType acc)
      : values(bank.to(acc).contiguous()), norms(inverse_norms(values)) {
    keys = values * norms.inverse.unsqueeze(1);
  }

  int64_t size() const { return values.size(0); }
  int64_t tile_size(int64_t j0) const { return std::min(kBankTile, size() - j0); }
};

// Rows [i0, i0 + rows) of x in the accumulation dtype, contiguous.
at::Tensor block_of(const at::Tensor& x, int64_t i0, int64_t rows, at::ScalarType acc) {
  return x.narrow(0, i0, rows).to(acc).contiguous();
}

// 1 / (max(|q_i|, eps) T) per query: the queries scaled by it have dot products with the keys equal to the scores.
at::Tensor score_scale(const at::Tensor& norm, double temperature) {
  return norm.clamp_min(kNormEps).reciprocal_().div_(temperature);
}

// Forward of one query block: the read-out (divided by the softmax sums) and each query's logsumexp.
std::tuple<at::Tensor, at::Tensor> forward_block(const at::Tensor& scaled, const Bank& bank) {
  const int64_t rows = scaled.size(0);
  at::Tensor run_max = at::full({rows}, -std::numeric_limits<double>::infinity(), scaled.options());
  at::Tensor run_sum = at::zeros({rows}, scaled.options());
  at::Tensor acc = at::zeros({rows, bank.values.size(1)}, scaled.options());
  for (int64_t j0 = 0; j0 < bank.size(); j0 += kBankTile) {
    const int64_t cols = bank.tile_size(j0);
    at::Tensor p = at::mm(scaled, bank.keys.narrow(0, j0, cols).t());  // scores, then exp(s - running max)
    const at::Tensor new_max = at::maximum(run_max, p.amax(1));
    const at::Tensor alpha = (run_max - new_max).exp_();
    p.sub_(new_max.unsqueeze(1)).exp_();
    run_sum.mul_(alpha).add_(p.sum(1));
    acc.mul_(alpha.unsqueeze(1)).addmm_(p, bank.values.narrow(0, j0, cols));
    run_max = new_max;
  }
  return {acc.div_(run_sum.unsqueeze(1)), run_max.add_(run_sum.log_())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& bank_in,
                                                       double temperature) {
  const at::ScalarType acc = accumulation_dtype(query.scalar_type());
  const Bank bank(bank_in, acc);
  const int64_t n = query.size(0);
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({n}, bank.values.options());
  at::Tensor query_norm = at::empty({n}, bank.values.options());
  const int64_t block_size = block_rows(n, bank.size(), query.size(1));
  at::parallel_for(0, ceil_div(n, block_size), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * block_size, rows = std::min(block_size, n - i0);
      const at::Tensor q = block_of(query, i0, rows, acc);
      const at::Tensor norm = query_norm.narrow(0, i0, rows).copy_(q.square().sum(1).sqrt_());
      auto [read_out, block_lse] = forward_block(q * score_scale(norm, temperature).unsqueeze(1), bank);
      out.narrow(0, i0, rows).copy_(read_out);
      lse.narrow(0, i0, rows).copy_(block_lse);
    }
  });
  return {out, lse, query_norm};
}

// Saved forward data of one query block for backward.
struct SavedBlock {
  at::Tensor query, grad_out, lse, norm, delta;  // delta_i = <dO_i, O_i>
};

// For a tile of scores s, probabilities p and dP: dS = p (dP - delta_i) and its products dS * s, summed into
// `row_sum` (per query) and `col_sum` (per item); dP is overwritten with E' = dS / |m_j|.
template <typename acc_t>
void score_grads(const at::Tensor& s, const at::Tensor& p, at::Tensor& dp, const at::Tensor& delta,
                 const at::Tensor& inverse, at::Tensor& row_sum, at::Tensor& col_sum) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const acc_t *sp = s.const_data_ptr<acc_t>(), *pp = p.const_data_ptr<acc_t>();
  const acc_t *dl = delta.const_data_ptr<acc_t>(), *inv = inverse.const_data_ptr<acc_t>();
  acc_t *e = dp.mutable_data_ptr<acc_t>(), *rs = row_sum.mutable_data_ptr<acc_t>(), *cs = col_sum.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t ij = i * cols + j;
      const acc_t ds = pp[ij] * (e[ij] - dl[i]);
      total += ds * sp[ij];
      cs[j] += ds * sp[ij];
      e[ij] = ds * inv[j];
    }
    rs[i] += total;
  }
}

// Backward of one query block: returns its query gradient; adds its bank-gradient terms to `bank_grad`
// ([M, D]: sum_i P_ij dO_i + sum_i dS_ij q_i / (|q_i| |m_j| T)) and `score_grad` ([M]: sum_i dS_ij s_ij).
at::Tensor backward_block(const SavedBlock& saved, const Bank& bank, double temperature, at::Tensor& bank_grad,
                          at::Tensor& score_grad) {
  const at::Tensor scale = score_scale(saved.norm, temperature);
  const at::Tensor scaled = saved.query * scale.unsqueeze(1);
  at::Tensor dq = at::zeros_like(saved.query);  // sum_j dS_ij m_j / |m_j|
  at::Tensor row_score_grad = at::zeros_like(saved.lse);
  for (int64_t j0 = 0; j0 < bank.size(); j0 += kBankTile) {
    const int64_t cols = bank.tile_size(j0);
    const at::Tensor values = bank.values.narrow(0, j0, cols);
    const at::Tensor s = at::mm(scaled, bank.keys.narrow(0, j0, cols).t());
    const at::Tensor p = (s - saved.lse.unsqueeze(1)).exp_();
    at::Tensor e = at::mm(saved.grad_out, values.t());
    at::Tensor tile_score_grad = score_grad.narrow(0, j0, cols);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dmgrd_memory_readout_score_grads", [&] {
      score_grads<scalar_t>(s, p, e, saved.delta, bank.norms.inverse.narrow(0, j0, cols), row_score_grad,
                            tile_score_grad);
    });
    dq.addmm_(e, values);
    bank_grad.narrow(0, j0, cols).addmm_(p.t(), saved.grad_out).addmm_(e.t(), scaled);
  }
  const at::Tensor weight = norm_grad_weight(saved.norm).mul_(row_score_grad);
  return dq.mul_(scale.unsqueeze(1)).sub_(saved.query * weight.unsqueeze(1));
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& bank_in, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& query_norm, double temperature) {
  const at::ScalarType acc = lse.scalar_type();
  const Bank bank(bank_in, acc);
  const int64_t n = query.size(0);
  at::Tensor grad_query = at::empty_like(query, at::MemoryFormat::Contiguous);
  // One private bank gradient per chunk of query blocks, chunks fixed in advance: deterministic sums.
  const int64_t block_size = block_rows(n, bank.size(), query.size(1));
  const int64_t blocks = ceil_div(n, block_size);
  const int64_t chunks = std::min<int64_t>(blocks, at::get_num_threads());
  at::Tensor bank_grads = at::zeros({chunks, bank.size(), query.size(1)}, bank.values.options());
  at::Tensor score_grads = at::zeros({chunks, bank.size()}, bank.values.options());
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor bank_grad = bank_grads[chunk], score_grad = score_grads[chunk];
      for (int64_t block = chunk * blocks / chunks; block < (chunk + 1) * blocks / chunks; ++block) {
        const int64_t i0 = block * block_size, rows = std::min(block_size, n - i0);
        SavedBlock saved{block_of(query, i0, rows, acc), block_of(grad_out, i0, rows, acc), lse.narrow(0, i0, rows),
                         query_norm.narrow(0, i0, rows), {}};
        saved.delta = (saved.grad_out * block_of(out, i0, rows, acc)).sum(1);
        grad_query.narrow(0, i0, rows).copy_(backward_block(saved, bank, temperature, bank_grad, score_grad));
      }
    }
  });
  return {grad_query, finish_bank_grad(bank_grads.sum(0), score_grads.sum(0), bank.values, bank.norms,
                                       bank_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_readout_cpu(const at::Tensor& query, const at::Tensor& bank,
                                                                  double temperature) {
  check_memory_readout_args(query, bank, temperature);
  return forward(query, bank, temperature);
}

std::tuple<at::Tensor, at::Tensor> memory_readout_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                                               const at::Tensor& bank, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& query_norm,
                                                               double temperature) {
  check_memory_readout_backward_args(grad_out, query, bank, out, lse, query_norm, temperature);
  return backward(grad_out, query, bank, out, lse, query_norm, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) {
  m.impl("memory_readout", &memory_readout_cpu);
  m.impl("memory_readout_backward", &memory_readout_backward_cpu);
}

}  // namespace dmgrd
