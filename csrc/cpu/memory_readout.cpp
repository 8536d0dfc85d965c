// CPU kernels of dmgrd::memory_readout and its backward, flash-attention style: blocks of queries run in
// parallel; each meets the bank tile by tile. The queries scaled by 1 / (|q| T) times the normalised bank tile
// (gemm.h) are the scores; the online softmax keeps a running max and sum per query. Backward recomputes P
// from the saved logsumexp, dS = P (dP - rowsum(dO * O)). Blocks have a fixed size and chunks of blocks a fixed
// count, both from the sizes alone; each chunk sums its bank gradient privately, chunks are added in order and
// every product sums in a fixed order (gemm.h), so the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "gemm.h"

namespace dmgrd {
namespace {

constexpr int64_t kBankTile = 256;                // a multiple of the gemm panel width
constexpr int64_t kTileScores = 128 * kBankTile;  // scores per (query block, bank tile): fits in L2 with its kin
constexpr int64_t kMaxChunks = 16;                // private bank gradients of the backward, at most

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Queries per block, from the sizes only: as many as keep a tile of scores in L2.
int64_t block_rows(int64_t n, int64_t items) {
  return std::min(std::max<int64_t>(n, 1), kTileScores / std::min(items, kBankTile));
}

// The bank in the accumulation dtype: raw values [M, D], 1 / max(|m_j|, eps), the weight of each norm's own
// gradient (1 / |m_j|^2 where it is not clamped, else 0), and the packings the products read.
template <typename acc_t>
struct Bank {
  at::Tensor values;
  std::vector<acc_t> inverse, grad_weight;
  gemm::Packed<acc_t> keys_t;    // keys^T [D, M]: scores = scaled queries * keys^T
  gemm::Packed<acc_t> values_t;  // values^T [D, M]: dP = dO * values^T
  gemm::Packed<acc_t> rows;      // values [M, D]: read-out = P * values

  Bank(const at::Tensor& bank, bool backward) : values(bank.to(c10::CppTypeToScalarType<acc_t>::value).contiguous()) {
    const int64_t m = values.size(0), d = values.size(1);
    const acc_t* v = values.const_data_ptr<acc_t>();
    inverse.resize(m);
    grad_weight.resize(m);
    std::vector<acc_t> keys(m * d);
    for (int64_t j = 0; j < m; ++j) {
      const acc_t norm = acc_sqrt(gemm::sum_squares(v + j * d, d));
      inverse[j] = acc_t(1) / clamp_norm(norm, kNormEps);
      grad_weight[j] = norm >= static_cast<acc_t>(kNormEps) ? inverse[j] * inverse[j] : acc_t(0);
      for (int64_t c = 0; c < d; ++c) keys[j * d + c] = v[j * d + c] * inverse[j];
    }
    keys_t = gemm::pack<acc_t>(keys.data(), d, m, 1, d);
    rows = gemm::pack<acc_t>(v, m, d, d, 1);
    if (backward) values_t = gemm::pack<acc_t>(v, d, m, 1, d);
  }

  int64_t size() const { return values.size(0); }
  int64_t dim() const { return values.size(1); }
  int64_t tile_size(int64_t j0) const { return std::min(kBankTile, size() - j0); }
  int64_t panel(int64_t j) const { return j / gemm::Packed<acc_t>::kPanel; }
  int64_t panel_end(int64_t j0) const { return ceil_div(j0 + tile_size(j0), gemm::Packed<acc_t>::kPanel); }
};

// Rows [i0, i0 + rows) of x, contiguous, in the accumulation dtype.
template <typename acc_t>
at::Tensor block_of(const at::Tensor& x, int64_t i0, int64_t rows) {
  return x.narrow(0, i0, rows).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// 1 / (max(|q_i|, eps) T) per query: the queries scaled by it have dot products with the keys equal to the scores.
template <typename acc_t>
acc_t score_scale(acc_t norm, double temperature) {
  return acc_t(1) / clamp_norm(norm, kNormEps) / static_cast<acc_t>(temperature);
}

// A query block: its rows, their norms and the rows scaled by score_scale.
template <typename acc_t>
struct QueryBlock {
  at::Tensor query;
  std::vector<acc_t> norm, scale, scaled;

  QueryBlock(const at::Tensor& q, double temperature) : query(q) {
    const int64_t rows = q.size(0), d = q.size(1);
    const acc_t* x = q.const_data_ptr<acc_t>();
    norm.resize(rows);
    scale.resize(rows);
    scaled.resize(rows * d);
    for (int64_t i = 0; i < rows; ++i) {
      norm[i] = acc_sqrt(gemm::sum_squares(x + i * d, d));
      scale[i] = score_scale(norm[i], temperature);
      for (int64_t c = 0; c < d; ++c) scaled[i * d + c] = x[i * d + c] * scale[i];
    }
  }

  int64_t rows() const { return query.size(0); }
  gemm::Strided<acc_t> scaled_rows() const { return {scaled.data(), query.size(1), 1}; }
};

// Scores [rows, cols] of bank tile j0 for a query block.
template <typename acc_t>
void tile_scores(const QueryBlock<acc_t>& q, const Bank<acc_t>& bank, int64_t j0, acc_t* scores) {
  gemm::multiply<acc_t>(q.rows(), q.scaled_rows(), bank.keys_t, 0, bank.dim(), bank.panel(j0), bank.panel_end(j0),
                        scores, bank.tile_size(j0), false);
}

// Forward of one query block: the read-out rows and each query's logsumexp.
template <typename acc_t>
void forward_block(const QueryBlock<acc_t>& q, const Bank<acc_t>& bank, acc_t* out, acc_t* lse) {
  const int64_t rows = q.rows(), d = bank.dim();
  std::vector<acc_t> run_max(rows, -std::numeric_limits<acc_t>::infinity()), run_sum(rows, acc_t(0));
  std::vector<acc_t> acc(rows * d, acc_t(0)), p(rows * kBankTile);
  for (int64_t j0 = 0; j0 < bank.size(); j0 += kBankTile) {
    const int64_t cols = bank.tile_size(j0);
    tile_scores(q, bank, j0, p.data());
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* row = p.data() + i * cols;
      acc_t new_max = run_max[i];
      for (int64_t j = 0; j < cols; ++j) new_max = std::max(new_max, row[j]);
      const acc_t alpha = std::exp(run_max[i] - new_max);
      acc_t total = 0;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = std::exp(row[j] - new_max);
        total += row[j];
      }
      run_sum[i] = run_sum[i] * alpha + total;
      run_max[i] = new_max;
      for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= alpha;
    }
    gemm::multiply<acc_t>(rows, {p.data(), cols, 1}, bank.rows, j0, cols, 0, bank.rows.panels(), acc.data(), d, true);
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = acc[i * d + c] / run_sum[i];
    lse[i] = run_max[i] + std::log(run_sum[i]);
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> readout_forward(const at::Tensor& query, const at::Tensor& bank_in,
                                                       double temperature) {
  const Bank<acc_t> bank(bank_in, false);
  const int64_t n = query.size(0), d = query.size(1);
  at::Tensor out = at::empty({n, d}, bank.values.options());
  at::Tensor lse = at::empty({n}, bank.values.options());
  at::Tensor query_norm = at::empty({n}, bank.values.options());
  const int64_t block_size = block_rows(n, bank.size());
  at::parallel_for(0, ceil_div(n, block_size), 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit it
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * block_size, rows = std::min(block_size, n - i0);
      const QueryBlock<acc_t> q(block_of<acc_t>(query, i0, rows), temperature);
      forward_block(q, bank, out.mutable_data_ptr<acc_t>() + i0 * d, lse.mutable_data_ptr<acc_t>() + i0);
      std::copy(q.norm.begin(), q.norm.end(), query_norm.mutable_data_ptr<acc_t>() + i0);
    }
  });
  return {out.to(query.scalar_type()), lse, query_norm};
}

// The bank-side sums of one chunk of query blocks: sum_i P_ij dO_i + sum_i dS_ij q_i / (|q_i| |m_j| T) per item
// [M, D], and sum_i dS_ij s_ij per item [M].
template <typename acc_t>
struct BankGrad {
  std::vector<acc_t> rows, score;
  BankGrad(int64_t m, int64_t d) : rows(m * d, acc_t(0)), score(m, acc_t(0)) {}
};

// Backward of one query block: writes its query gradient, adds its bank terms to `grad`.
template <typename acc_t>
void backward_block(const QueryBlock<acc_t>& q, const at::Tensor& grad_out, const at::Tensor& out,
                    const acc_t* lse, const Bank<acc_t>& bank, BankGrad<acc_t>& grad, acc_t* grad_query) {
  const int64_t rows = q.rows(), d = bank.dim();
  const acc_t* dout = grad_out.const_data_ptr<acc_t>();
  const acc_t* o = out.const_data_ptr<acc_t>();
  std::vector<acc_t> delta(rows, acc_t(0));  // <dO_i, O_i>
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < d; ++c) delta[i] += dout[i * d + c] * o[i * d + c];
  }
  const gemm::Packed<acc_t> dout_rows = gemm::pack<acc_t>(dout, rows, d, d, 1);
  const gemm::Packed<acc_t> scaled_rows = gemm::pack<acc_t>(q.scaled.data(), rows, d, d, 1);
  std::vector<acc_t> dq(rows * d, acc_t(0)), row_score_grad(rows, acc_t(0));
  std::vector<acc_t> s(rows * kBankTile), e(rows * kBankTile), p(rows * kBankTile);
  for (int64_t j0 = 0; j0 < bank.size(); j0 += kBankTile) {
    const int64_t cols = bank.tile_size(j0);
    tile_scores(q, bank, j0, s.data());
    gemm::multiply<acc_t>(rows, {dout, d, 1}, bank.values_t, 0, d, bank.panel(j0), bank.panel_end(j0), e.data(), cols,
                          false);
    for (int64_t i = 0; i < rows; ++i) {
      acc_t total = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t ij = i * cols + j;
        p[ij] = std::exp(s[ij] - lse[i]);
        const acc_t ds = p[ij] * (e[ij] - delta[i]);
        total += ds * s[ij];
        grad.score[j0 + j] += ds * s[ij];
        e[ij] = ds * bank.inverse[j0 + j];  // E' = dS / |m_j|
      }
      row_score_grad[i] += total;
    }
    gemm::multiply<acc_t>(rows, {e.data(), cols, 1}, bank.rows, j0, cols, 0, bank.rows.panels(), dq.data(), d, true);
    acc_t* bank_rows = grad.rows.data() + j0 * d;
    gemm::multiply<acc_t>(cols, {p.data(), 1, cols}, dout_rows, bank_rows, d, true);
    gemm::multiply<acc_t>(cols, {e.data(), 1, cols}, scaled_rows, bank_rows, d, true);
  }
  const acc_t* x = q.query.template const_data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t clamped = clamp_norm(q.norm[i], kNormEps);
    const acc_t weight = (q.norm[i] >= static_cast<acc_t>(kNormEps) ? acc_t(1) / (clamped * clamped) : acc_t(0)) *
                         row_score_grad[i];
    for (int64_t c = 0; c < d; ++c) grad_query[i * d + c] = dq[i * d + c] * q.scale[i] - x[i * d + c] * weight;
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> readout_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& bank_in, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& query_norm, double temperature) {
  const Bank<acc_t> bank(bank_in, true);
  const int64_t n = query.size(0), d = query.size(1), m = bank.size();
  at::Tensor grad_query = at::empty({n, d}, bank.values.options());
  const int64_t block_size = block_rows(n, m);
  const int64_t blocks = ceil_div(n, block_size);
  const int64_t chunks = std::min(blocks, kMaxChunks);
  std::vector<BankGrad<acc_t>> grads(chunks, BankGrad<acc_t>(m, d));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t block = chunk * blocks / chunks; block < (chunk + 1) * blocks / chunks; ++block) {
        const int64_t i0 = block * block_size, rows = std::min(block_size, n - i0);
        const QueryBlock<acc_t> q(block_of<acc_t>(query, i0, rows), temperature);
        backward_block(q, block_of<acc_t>(grad_out, i0, rows), block_of<acc_t>(out, i0, rows),
                       lse.const_data_ptr<acc_t>() + i0, bank, grads[chunk], grad_query.mutable_data_ptr<acc_t>() + i0 * d);
      }
    }
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    for (int64_t i = 0; i < m * d; ++i) grads[0].rows[i] += grads[chunk].rows[i];
    for (int64_t j = 0; j < m; ++j) grads[0].score[j] += grads[chunk].score[j];
  }
  // grad_bank = the summed read-out and key terms - m_j (sum_i dS_ij s_ij) grad_weight_j
  at::Tensor grad_bank = at::empty({m, d}, bank.values.options());
  acc_t* gb = grad_bank.mutable_data_ptr<acc_t>();
  const acc_t* v = bank.values.template const_data_ptr<acc_t>();
  for (int64_t j = 0; j < m; ++j) {
    const acc_t w = grads[0].score[j] * bank.grad_weight[j];
    for (int64_t c = 0; c < d; ++c) gb[j * d + c] = grads[0].rows[j * d + c] - v[j * d + c] * w;
  }
  return {grad_query.to(query.scalar_type()), grad_bank.to(bank_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_readout_cpu(const at::Tensor& query, const at::Tensor& bank,
                                                                  double temperature) {
  check_memory_readout_args(query, bank, temperature);
  if (accumulation_dtype(query.scalar_type()) == at::kDouble) return readout_forward<double>(query, bank, temperature);
  return readout_forward<float>(query, bank, temperature);
}

std::tuple<at::Tensor, at::Tensor> memory_readout_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                                               const at::Tensor& bank, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& query_norm,
                                                               double temperature) {
  check_memory_readout_backward_args(grad_out, query, bank, out, lse, query_norm, temperature);
  if (accumulation_dtype(query.scalar_type()) == at::kDouble) {
    return readout_backward<double>(grad_out, query, bank, out, lse, query_norm, temperature);
  }
  return readout_backward<float>(grad_out, query, bank, out, lse, query_norm, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmgrd, CPU, m) {
  m.impl("memory_readout", &memory_readout_cpu);
  m.impl("memory_readout_backward", &memory_readout_backward_cpu);
}

}  // namespace dmgrd
