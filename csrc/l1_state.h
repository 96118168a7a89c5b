// The L1 measure of one row, shared by the CPU and CUDA kernels (DESIGN.md, "A
// scale-invariant companion").
//
// With a_i = max(x_i, 0) over the L positions of a row and p_i = a_i / S:
//   S  = sum_i a_i,   T = sum_i a_i log a_i   (0 log 0 = 0)
//   H  = log S - T / S = -sum_i p_i log p_i,   PP = exp(H),   SP = (L - PP) / (L - 1)
// One pass, no exp and no max: two states over disjoint parts of a row merge by plain
// addition, so any fixed split gives the same result up to rounding, and the same bits for
// a fixed merge order. Scaling a row by c > 0 adds log c to both log S and T / S: H is
// scale invariant.
//
// Special rows, the same on every backend:
//   * dead (no positive value, S == 0; x_i <= 0 everywhere, -inf included):
//     H = log L, PP = L, SP = 0 (a uniform row: no evidence of concentration), T/S stored
//     as 0, gradient 0.
//   * NaN anywhere, or +inf (T/S = inf/inf), gives NaN in H, PP and SP.
//   * L == 1: H = 0, PP = 1, SP = 0 (NaN stays NaN), gradient 0.
// Gradient, for x_i > 0 (derived in l1_backward_coefficient below):
//   dH/dx_i = -(log a_i - T/S) / S
// and exactly 0 where x_i <= 0 (the ReLU convention; never NaN, even in a NaN row, whose
// other positions get NaN).
//
// Plain C++ with no torch headers: usable from host code and from __device__ code.
#pragma once

#include <cmath>

#ifndef SPARSITY_EXT_HD
#if defined(__CUDACC__)
#define SPARSITY_EXT_HD __host__ __device__ __forceinline__
#else
#define SPARSITY_EXT_HD inline __attribute__((always_inline))
#endif
#endif

namespace sparsity_ext {

// True for positions that carry mass: x > 0, and NaN (so that NaN reaches S and T and
// poisons the row). Written as !(x <= 0) for exactly that reason.
template <typename acc_t>
SPARSITY_EXT_HD bool l1_live(acc_t x) {
  return !(x <= acc_t(0));
}

template <typename acc_t>
struct L1State {
  acc_t sum;              // S = sum_i a_i
  acc_t xlogx;            // T = sum_i a_i log a_i
  acc_t total;            // sum_i x_i (NaN and +-inf propagate): the monitor's mean
  long long nonpositive;  // count of x_i <= 0 (-inf included): the monitor's zero fraction

  SPARSITY_EXT_HD static L1State empty() { return {acc_t(0), acc_t(0), acc_t(0), 0}; }

  // Folds one position into the state.
  SPARSITY_EXT_HD void add(acc_t x) {
    if (l1_live(x)) {
      sum += x;
      xlogx += x * std::log(x);  // NaN -> NaN, +inf -> +inf
    } else {
      ++nonpositive;
    }
    total += x;
  }

  // Adds the state of a disjoint part of the same row.
  SPARSITY_EXT_HD void merge(const L1State& other) {
    sum += other.sum;
    xlogx += other.xlogx;
    total += other.total;
    nonpositive += other.nonpositive;
  }
};

// What the forward writes per row: the three outputs and T/S (with S, all the backward needs).
template <typename acc_t>
struct L1RowResult {
  acc_t entropy;
  acc_t perplexity;
  acc_t sparsity;
  acc_t mean_log;  // T / S = sum_i p_i log a_i; 0 for a dead row
};

// `log_positions` is log(L), computed once by the caller so that every row and backend
// gives a dead row the same bits.
template <typename acc_t>
SPARSITY_EXT_HD L1RowResult<acc_t> l1_finalize(acc_t sum, acc_t xlogx, long long positions,
                                               acc_t log_positions) {
  const acc_t length = static_cast<acc_t>(positions);
  L1RowResult<acc_t> r;
  if (sum == acc_t(0)) {  // dead row (a NaN row has S = NaN and does not come here)
    r.mean_log = acc_t(0);
    r.entropy = log_positions;
    r.perplexity = length;
    r.sparsity = acc_t(0);
    return r;
  }
  r.mean_log = xlogx / sum;
  r.entropy = std::log(sum) - r.mean_log;
  // L == 1: log a - (a log a) / a may round to +-1 ulp instead of 0.
  if (positions == 1) r.entropy *= acc_t(0);
  r.perplexity = std::exp(r.entropy);
  r.sparsity = positions > 1 ? (length - r.perplexity) / (length - acc_t(1))
                             : r.perplexity * acc_t(0);
  return r;
}

// Gradient of any loss through (H, PP, SP) of one row. For x_i > 0, with p_i = a_i / S,
//   dH/dx_i  = d/dx_i (log S - T/S) = 1/S - (log a_i + 1)/S + T/S^2 = -(log a_i - T/S) / S
//   dPP/dx_i = PP dH/dx_i,   dSP/dx_i = -dPP/dx_i / (L - 1)
// so grad_x_i = coef * (log x_i - T/S) with one coefficient per row:
//   coef = -(g_H + PP g_PP - PP g_SP / (L - 1)) / S.
// Dead rows and L == 1 rows have constant outputs: coef 0 (NaN stays NaN for L == 1).
template <typename acc_t>
SPARSITY_EXT_HD acc_t l1_backward_coefficient(acc_t sum, acc_t mean_log, acc_t grad_entropy,
                                              acc_t grad_perplexity, acc_t grad_sparsity,
                                              long long positions) {
  if (sum == acc_t(0)) return acc_t(0);  // dead: every x_i <= 0 gets 0 anyway; 1/S is inf
  const acc_t perplexity = std::exp(std::log(sum) - mean_log);
  acc_t g = grad_entropy + perplexity * grad_perplexity;
  if (positions > 1) g -= perplexity * grad_sparsity / static_cast<acc_t>(positions - 1);
  const acc_t coef = -g / sum;
  return positions > 1 ? coef : coef * acc_t(0);
}

// One element of the backward. x_i <= 0 (and -inf) gets exactly 0 whatever coef is; every
// other position of a NaN or +inf row gets NaN through coef or mean_log.
template <typename acc_t>
SPARSITY_EXT_HD acc_t l1_grad_element(acc_t x, acc_t mean_log, acc_t coef) {
  return l1_live(x) ? coef * (std::log(x) - mean_log) : acc_t(0);
}

}  // namespace sparsity_ext
