// Online softmax-entropy state of one row, shared by the CPU and CUDA kernels.
//
// For a row x_1..x_L the state holds, relative to the running maximum m,
//   sum     = sum_i exp(x_i - m)
//   shifted = sum_i (x_i - m) * exp(x_i - m)
// from which entropy H = log(sum) - shifted / sum. Two states over disjoint parts of a
// row merge exactly (rescale both to the larger maximum), so any split of a row into
// chunks, lanes or threads gives the same result up to rounding, and a fixed merge
// order gives the same bits every time.
//
// Plain C++ with no torch headers: usable from host code and from __device__ code.
#pragma once

#include <cmath>

// Always inlined on the host: these headers are compiled into every CPU capability's
// kernels (-mavx512f in one, none in another), and an out-of-line copy would be merged
// across them by the linker, so a DEFAULT build could run AVX-512 code.
#ifndef SPARSITY_EXT_HD
#if defined(__CUDACC__)
#define SPARSITY_EXT_HD __host__ __device__ __forceinline__
#else
#define SPARSITY_EXT_HD inline __attribute__((always_inline))
#endif
#endif

namespace sparsity_ext {

// Shifted values (x_i - m) are clamped from below to this: exp() of it is exactly 0 in
// acc_t, and (x_i - m) * exp(x_i - m) is then 0 instead of -inf * 0 = NaN for a masked
// (-inf) position. Finite positions that far below the maximum contribute nothing
// representable anyway. Max with NaN keeps NaN (see clamp_shift).
template <typename acc_t>
struct ShiftFloor;
template <>
struct ShiftFloor<float> {
  static constexpr float value = -128.0f;  // exp(-128) < 2^-149, the smallest float
};
template <>
struct ShiftFloor<double> {
  static constexpr double value = -800.0;  // exp(-800) < 2^-1074, the smallest double
};

template <typename acc_t>
SPARSITY_EXT_HD acc_t clamp_shift(acc_t shift) {
  // Written so that a NaN shift stays NaN.
  return shift < ShiftFloor<acc_t>::value ? ShiftFloor<acc_t>::value : shift;
}

template <typename acc_t>
struct EntropyState {
  acc_t max;      // running row maximum (-inf while nothing finite was seen)
  acc_t sum;      // sum exp(x_i - max)
  acc_t shifted;  // sum (x_i - max) exp(x_i - max)

  SPARSITY_EXT_HD static EntropyState empty() {
    // -INFINITY rather than numeric_limits: usable in device code without relaxed constexpr.
    return {static_cast<acc_t>(-INFINITY), acc_t(0), acc_t(0)};
  }

  // Rescales a state to a new maximum `to` (>= this->max, finite or not).
  SPARSITY_EXT_HD void rescale_to(acc_t to, acc_t& sum_out, acc_t& shifted_out) const {
    if (sum == acc_t(0)) {  // empty or all-masked part: contributes nothing
      sum_out = acc_t(0);
      shifted_out = acc_t(0);
      return;
    }
    // <= 0, NaN if either is NaN. Clamped like a shifted value: a part that far below the
    // new maximum scales to exactly 0, and delta * sum cannot overflow to -inf (-inf * 0).
    const acc_t delta = clamp_shift(max - to);
    const acc_t scale = delta == acc_t(0) ? acc_t(1) : std::exp(delta);  // one side is exact
    sum_out = sum * scale;
    shifted_out = (shifted + delta * sum) * scale;
  }

  // Adds the state of a disjoint part of the same row.
  SPARSITY_EXT_HD void merge(const EntropyState& other) {
    if (other.sum == acc_t(0)) return;  // nothing (or only masked positions) on that side
    if (sum == acc_t(0)) {
      *this = other;
      return;
    }
    // NaN in either maximum must win, so compare in the direction that keeps it.
    const acc_t to = (other.max > max || other.max != other.max) ? other.max : max;
    acc_t s1, t1, s2, t2;
    rescale_to(to, s1, t1);
    other.rescale_to(to, s2, t2);
    max = to;
    sum = s1 + s2;
    shifted = t1 + t2;
  }
};

// What the forward writes per row: the three outputs, and the three statistics the
// one-pass backward needs (max, log(sum), shifted / sum).
template <typename acc_t>
struct RowResult {
  acc_t entropy;
  acc_t perplexity;
  acc_t sparsity;
  acc_t max;
  acc_t log_sum;
  acc_t mean_shift;  // sum_i p_i (x_i - max), i.e. mu - max
};

// L == 1 gives entropy 0, perplexity 1, sparsity 0; NaN stays NaN in all three.
template <typename acc_t>
SPARSITY_EXT_HD RowResult<acc_t> finalize(const EntropyState<acc_t>& state, long long positions) {
  RowResult<acc_t> r;
  r.max = state.max;
  r.log_sum = std::log(state.sum);
  r.mean_shift = state.shifted / state.sum;
  r.entropy = r.log_sum - r.mean_shift;
  r.perplexity = std::exp(r.entropy);
  const acc_t length = static_cast<acc_t>(positions);
  r.sparsity = positions > 1 ? (length - r.perplexity) / (length - acc_t(1))
                             : r.perplexity * acc_t(0);
  return r;
}

// Gradient of any loss through (entropy, perplexity, sparsity) of one row, derived from
//   dH/dx_i  = -p_i (x_i - mu),  p_i = exp(x_i - max - log_sum),  mu = max + mean_shift
//   dPP/dx_i = PP dH/dx_i,       dSP/dx_i = -dPP/dx_i / (L - 1)
// so grad_x_i = coef * p_i * (x_i - mu) with one coefficient per row:
//   coef = -(g_H + PP g_PP - PP g_SP / (L - 1)).
template <typename acc_t>
SPARSITY_EXT_HD acc_t backward_coefficient(
    acc_t log_sum, acc_t mean_shift, acc_t grad_entropy, acc_t grad_perplexity,
    acc_t grad_sparsity, long long positions) {
  const acc_t perplexity = std::exp(log_sum - mean_shift);
  acc_t g = grad_entropy + perplexity * grad_perplexity;
  if (positions > 1) g -= perplexity * grad_sparsity / static_cast<acc_t>(positions - 1);
  return -g;
}

// One element of the backward: shift = x_i - max (before clamping).
template <typename acc_t>
SPARSITY_EXT_HD acc_t grad_element(acc_t shift, acc_t log_sum, acc_t mean_shift, acc_t coef) {
  const acc_t d = clamp_shift(shift);
  return coef * std::exp(d - log_sum) * (d - mean_shift);
}

}  // namespace sparsity_ext
