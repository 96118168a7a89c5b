#include "launch.h"

#include <ATen/ATen.h>

namespace sparsity_ext {
namespace {

ScalarKind scalar_kind(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kDouble: return ScalarKind::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "sparsity_ext: expected a floating-point tensor (float16, bfloat16, "
                       "float32 or float64), got ", x.scalar_type());
  }
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "sparsity_ext: expected a tensor of shape (N, C, *spatial) with at "
              "least one spatial dim, got ", x.dim(), " dims of shape ", x.sizes());
  scalar_kind(x);
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  TORCH_CHECK(positions > 0, "sparsity_ext: the softmax is taken over the spatial positions, but "
              "shape ", x.sizes(), " has zero spatial positions");
}

int64_t positions_of(const at::Tensor& x) {
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  return positions;
}

// True when the spatial dims of x form one run of positions `step` elements apart
// (size-1 dims carry no layout information and are skipped).
bool positions_strided_by(const at::Tensor& x, int64_t step) {
  int64_t expected = step;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

// Contiguous NCHW and channels_last(_3d), or their 1-D/any-D analogues, are read in
// place; anything else takes one contiguous copy.
RowLayout resolve_layout(at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), positions = positions_of(x);
  const bool batch_dense = n == 1 || x.stride(0) == c * positions;
  if (batch_dense && (c == 1 || x.stride(1) == positions) && positions_strided_by(x, 1)) {
    return RowLayout::kRows;
  }
  if (batch_dense && (c == 1 || x.stride(1) == 1) && positions_strided_by(x, c)) {
    return RowLayout::kChannelsLast;
  }
  x = x.contiguous();
  return RowLayout::kRows;
}

void check_grad(const at::Tensor& grad, const at::Tensor& x, const char* name) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1),
              "sparsity_ext: ", name, " must have shape (N, C) = ", x.sizes().slice(0, 2),
              ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "sparsity_ext: ", name,
                   " must have the dtype of x (", x.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "sparsity_ext: ", name, " is on ", grad.device(),
              " but x is on ", x.device());
}

}  // namespace

ForwardCall prepare_forward(const at::Tensor& input) {
  check_input(input);
  ForwardCall call;
  call.x = input;
  const RowLayout layout = resolve_layout(call.x);
  const int64_t n = input.size(0), c = input.size(1);
  call.entropy = at::empty({n, c}, input.options());
  call.perplexity = at::empty({n, c}, input.options());
  call.sparsity = at::empty({n, c}, input.options());
  call.row_stats = at::empty({3, n, c}, input.options().dtype(accumulation_type(input)));
  call.params = ForwardParams{call.x.const_data_ptr(), call.entropy.mutable_data_ptr(),
                              call.perplexity.mutable_data_ptr(), call.sparsity.mutable_data_ptr(),
                              call.row_stats.mutable_data_ptr(), n, c, positions_of(input),
                              layout, scalar_kind(input)};
  return call;
}

BackwardCall prepare_backward(
    const at::Tensor& input, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity) {
  check_input(input);
  const int64_t n = input.size(0), c = input.size(1);
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == 3 && row_stats.size(1) == n &&
                  row_stats.size(2) == c,
              "sparsity_ext: row_stats must have shape (3, N, C) = (3, ", n, ", ", c, "), got ",
              row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == accumulation_type(input),
                   "sparsity_ext: row_stats must have dtype ", accumulation_type(input), ", got ",
                   row_stats.scalar_type());
  TORCH_CHECK(row_stats.device() == input.device(), "sparsity_ext: row_stats is on ",
              row_stats.device(), " but x is on ", input.device());
  check_grad(grad_entropy, input, "grad_entropy");
  check_grad(grad_perplexity, input, "grad_perplexity");
  check_grad(grad_sparsity, input, "grad_sparsity");

  BackwardCall call;
  call.x = input;
  const RowLayout layout = resolve_layout(call.x);
  call.row_stats = row_stats.contiguous();
  call.grad_entropy = grad_entropy;
  call.grad_perplexity = grad_perplexity;
  call.grad_sparsity = grad_sparsity;
  // x is now dense in `layout`, so empty_like keeps exactly that layout for grad_x.
  call.grad_x = at::empty_like(call.x);
  BackwardParams& p = call.params;
  p.x = call.x.const_data_ptr();
  p.row_stats = call.row_stats.const_data_ptr();
  p.grad_entropy = grad_entropy.const_data_ptr();
  p.grad_perplexity = grad_perplexity.const_data_ptr();
  p.grad_sparsity = grad_sparsity.const_data_ptr();
  const at::Tensor* grads[3] = {&grad_entropy, &grad_perplexity, &grad_sparsity};
  for (int k = 0; k < 3; ++k) {
    p.grad_strides[k][0] = grads[k]->stride(0);
    p.grad_strides[k][1] = grads[k]->stride(1);
  }
  p.grad_x = call.grad_x.mutable_data_ptr();
  p.batch = n;
  p.channels = c;
  p.positions = positions_of(input);
  p.layout = layout;
  p.dtype = scalar_kind(input);
  return call;
}

}  // namespace sparsity_ext
