#include "launch.h"
#include "l1_launch.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

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

int64_t positions_of(const at::Tensor& x) {
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  return positions;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "sparsity_ext: expected a tensor of shape (N, C, *spatial) with at "
              "least one spatial dim, got ", x.dim(), " dims of shape ", x.sizes());
  scalar_kind(x);
  TORCH_CHECK(positions_of(x) > 0, "sparsity_ext: the softmax is taken over the spatial "
              "positions, but shape ", x.sizes(), " has zero spatial positions");
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

struct ResolvedLayout {
  RowLayout layout;
  RowStrides strides;
};

// Positions unit-stride (NCHW-like) or channels unit-stride (channels_last-like, any
// number of spatial dims) are read in place whatever the batch and other stride, so
// slices and expanded views cost nothing; anything else takes one contiguous copy.
ResolvedLayout resolve_layout(at::Tensor& x) {
  const int64_t c = x.size(1), positions = positions_of(x);
  const int64_t batch_stride = x.size(0) == 1 ? 0 : x.stride(0);
  if (positions_strided_by(x, 1)) {
    return {RowLayout::kRows, {batch_stride, c == 1 ? 0 : x.stride(1), 1}};
  }
  if (c > 1 && x.stride(1) == 1) {
    // The innermost spatial dim of size > 1 sets the position step; the rest must follow.
    for (int64_t d = x.dim() - 1; d >= 2; --d) {
      if (x.size(d) > 1) {
        if (positions_strided_by(x, x.stride(d))) {
          return {RowLayout::kChannelsLast, {batch_stride, 1, x.stride(d)}};
        }
        break;
      }
    }
  }
  x = x.contiguous();
  return {RowLayout::kRows, {c * positions, positions, 1}};
}

// grad_x is dense in the layout x was read in: contiguous, or channels innermost.
std::pair<at::Tensor, RowStrides> allocate_dense_like(const at::Tensor& x, RowLayout layout) {
  const int64_t c = x.size(1), positions = positions_of(x);
  if (layout == RowLayout::kRows) {
    return {at::empty(x.sizes(), x.options()), {c * positions, positions, 1}};
  }
  std::vector<int64_t> perm{0}, inverse{0, x.dim() - 1};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  for (int64_t d = 1; d < x.dim() - 1; ++d) inverse.push_back(d);
  std::vector<int64_t> permuted_sizes;
  for (int64_t d : perm) permuted_sizes.push_back(x.size(d));
  at::Tensor grad = at::empty(permuted_sizes, x.options()).permute(inverse);
  return {grad, {positions * c, 1, c}};
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
  const ResolvedLayout resolved = resolve_layout(call.x);
  const int64_t n = input.size(0), c = input.size(1);
  call.entropy = at::empty({n, c}, input.options());
  call.perplexity = at::empty({n, c}, input.options());
  call.sparsity = at::empty({n, c}, input.options());
  call.row_stats = at::empty({3, n, c}, input.options().dtype(accumulation_type(input)));
  call.params = ForwardParams{call.x.const_data_ptr(), call.entropy.mutable_data_ptr(),
                              call.perplexity.mutable_data_ptr(), call.sparsity.mutable_data_ptr(),
                              call.row_stats.mutable_data_ptr(), n, c, positions_of(input),
                              resolved.layout, scalar_kind(input), resolved.strides};
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
  const ResolvedLayout resolved = resolve_layout(call.x);
  call.row_stats = row_stats.contiguous();
  call.grad_entropy = grad_entropy;
  call.grad_perplexity = grad_perplexity;
  call.grad_sparsity = grad_sparsity;
  RowStrides grad_x_strides;
  std::tie(call.grad_x, grad_x_strides) = allocate_dense_like(input, resolved.layout);
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
  p.layout = resolved.layout;
  p.dtype = scalar_kind(input);
  p.x_strides = resolved.strides;
  p.grad_x_strides = grad_x_strides;
  return call;
}

}  // namespace sparsity_ext

// --- l1_stats (l1_launch.h): the same input checks, layout resolution and grad_x allocation
// as channel_stats; only row_stats differs, (4, N, C).

namespace sparsity_ext {

L1ForwardCall prepare_l1_forward(const at::Tensor& input) {
  check_input(input);
  L1ForwardCall call;
  call.x = input;
  const ResolvedLayout resolved = resolve_layout(call.x);
  const int64_t n = input.size(0), c = input.size(1);
  call.entropy = at::empty({n, c}, input.options());
  call.perplexity = at::empty({n, c}, input.options());
  call.sparsity = at::empty({n, c}, input.options());
  call.row_stats = at::empty({kL1Stats, n, c}, input.options().dtype(accumulation_type(input)));
  call.params = L1ForwardParams{call.x.const_data_ptr(), call.entropy.mutable_data_ptr(),
                                call.perplexity.mutable_data_ptr(),
                                call.sparsity.mutable_data_ptr(), call.row_stats.mutable_data_ptr(),
                                n, c, positions_of(input), resolved.layout, scalar_kind(input),
                                resolved.strides};
  return call;
}

L1BackwardCall prepare_l1_backward(
    const at::Tensor& input, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity) {
  check_input(input);
  const int64_t n = input.size(0), c = input.size(1);
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == kL1Stats && row_stats.size(1) == n &&
                  row_stats.size(2) == c,
              "sparsity_ext: l1 row_stats must have shape (4, N, C) = (4, ", n, ", ", c,
              "), got ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == accumulation_type(input),
                   "sparsity_ext: row_stats must have dtype ", accumulation_type(input), ", got ",
                   row_stats.scalar_type());
  TORCH_CHECK(row_stats.device() == input.device(), "sparsity_ext: row_stats is on ",
              row_stats.device(), " but x is on ", input.device());
  check_grad(grad_entropy, input, "grad_entropy");
  check_grad(grad_perplexity, input, "grad_perplexity");
  check_grad(grad_sparsity, input, "grad_sparsity");

  L1BackwardCall call;
  call.x = input;
  const ResolvedLayout resolved = resolve_layout(call.x);
  call.row_stats = row_stats.contiguous();
  call.grad_entropy = grad_entropy;
  call.grad_perplexity = grad_perplexity;
  call.grad_sparsity = grad_sparsity;
  RowStrides grad_x_strides;
  std::tie(call.grad_x, grad_x_strides) = allocate_dense_like(input, resolved.layout);
  L1BackwardParams& p = call.params;
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
  p.layout = resolved.layout;
  p.dtype = scalar_kind(input);
  p.x_strides = resolved.strides;
  p.grad_x_strides = grad_x_strides;
  return call;
}

}  // namespace sparsity_ext
