#include "host_prepare.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace sparsity_ext {
namespace {

// Every message below is, word for word, the one sparsity_ext/ops.py raises for the same
// argument (its fake and fallback kernels, and the public functions), so a bad call fails
// the same way eagerly, under torch.compile and without the compiled extension.

std::string dtype_name(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// The one C++ definition of the accumulation type (Python: reference.accumulation_dtype).
at::ScalarType accumulation_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

ScalarKind scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    default: return ScalarKind::kFloat64;  // check_input let nothing else through
  }
}

int64_t positions_of(const at::Tensor& x) {
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  return positions;
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided && !t.is_nested(), "sparsity_ext: ", name,
                   " must be a dense (strided) tensor; sparse, nested and other layouts are "
                   "not supported");
}

void check_input(const at::Tensor& x) {
  check_dense(x, "x");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
                   "sparsity_ext: x must be a floating-point tensor (float16, bfloat16, float32 "
                   "or float64), got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.dim() >= 3, "sparsity_ext: x must have shape (N, C, *spatial) with at "
                    "least one spatial dim, got shape ", x.sizes());
  TORCH_CHECK_VALUE(positions_of(x) > 0, "sparsity_ext: x must have at least one spatial "
                    "position, got shape ", x.sizes());
}

// row_stats, the output grads and grad_x: layout, device, dtype, shape, in that order.
void check_argument(const at::Tensor& t, const char* name, const at::Tensor& x,
                    at::ScalarType dtype, at::IntArrayRef shape) {
  check_dense(t, name);
  TORCH_CHECK(t.device() == x.device(), "sparsity_ext: all tensors must be on the same device, "
              "but x is on ", x.device(), " and ", name, " is on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "sparsity_ext: ", name, " must have dtype ",
                   dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, "sparsity_ext: ", name, " must have shape ", shape,
                    ", got ", t.sizes());
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

// How the kernels can walk x in place, if at all: positions unit-stride (NCHW-like) or
// channels unit-stride with evenly strided positions (channels_last-like, any number of
// spatial dims), whatever the batch stride, so slices and expanded views cost nothing.
c10::optional<ResolvedLayout> in_place_layout(const at::Tensor& x) {
  const int64_t batch_stride = x.size(0) == 1 ? 0 : x.stride(0);
  if (positions_strided_by(x, 1)) {
    return ResolvedLayout{RowLayout::kRows, {batch_stride, x.size(1) == 1 ? 0 : x.stride(1), 1}};
  }
  if (x.size(1) > 1 && x.stride(1) == 1) {
    // The innermost spatial dim of size > 1 sets the position step; the rest must follow.
    for (int64_t d = x.dim() - 1; d >= 2; --d) {
      if (x.size(d) > 1) {
        if (positions_strided_by(x, x.stride(d))) {
          return ResolvedLayout{RowLayout::kChannelsLast, {batch_stride, 1, x.stride(d)}};
        }
        break;
      }
    }
  }
  return c10::nullopt;
}

}  // namespace

ForwardCall prepare_forward(const at::Tensor& input, int64_t row_stats_rows,
                            const EmptyTensor& empty) {
  check_input(input);
  ForwardCall call;
  c10::optional<ResolvedLayout> resolved = in_place_layout(input);
  const auto allocate = [&](at::IntArrayRef sizes, at::ScalarType dtype) {
    return empty ? empty(sizes, dtype) : at::empty(sizes, input.options().dtype(dtype));
  };
  // Anything else: one contiguous copy.
  call.x = resolved ? input : allocate(input.sizes(), input.scalar_type()).copy_(input);
  if (!resolved) resolved = in_place_layout(call.x);
  const int64_t n = input.size(0), c = input.size(1);
  call.entropy = allocate({n, c}, input.scalar_type());
  call.perplexity = allocate({n, c}, input.scalar_type());
  call.sparsity = allocate({n, c}, input.scalar_type());
  call.row_stats = allocate({row_stats_rows, n, c}, accumulation_type(input.scalar_type()));
  call.params = ForwardParams{call.x.const_data_ptr(), call.entropy.mutable_data_ptr(),
                              call.perplexity.mutable_data_ptr(), call.sparsity.mutable_data_ptr(),
                              call.row_stats.mutable_data_ptr(), n, c, positions_of(input),
                              resolved->layout, scalar_kind(input.scalar_type()),
                              resolved->strides};
  return call;
}

at::Tensor empty_grad_x(const at::Tensor& x, const EmptyTensor& empty) {
  check_input(x);
  const int64_t dims = x.dim();
  bool channels_innermost = false;
  if (x.size(1) > 1 && x.stride(1) == 1) {
    for (int64_t d = 2; d < dims; ++d) {
      channels_innermost = channels_innermost || (x.size(d) > 1 && x.stride(d) != 1);
    }
  }
  if (!channels_innermost) return empty(x.sizes(), x.scalar_type());
  // Allocated as (N, *spatial, C), viewed as (N, C, *spatial).
  std::vector<int64_t> sizes{x.size(0)}, inverse{0, dims - 1};
  for (int64_t d = 2; d < dims; ++d) sizes.push_back(x.size(d));
  sizes.push_back(x.size(1));
  for (int64_t d = 1; d < dims - 1; ++d) inverse.push_back(d);
  return empty(sizes, x.scalar_type()).permute(inverse);
}

BackwardCall prepare_backward(
    const at::Tensor& input, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity, at::Tensor& grad_x,
    int64_t row_stats_rows) {
  check_input(input);
  const int64_t n = input.size(0), c = input.size(1);
  const at::ScalarType dtype = input.scalar_type();
  check_argument(row_stats, "row_stats", input, accumulation_type(dtype), {row_stats_rows, n, c});
  check_argument(grad_entropy, "grad_entropy", input, dtype, {n, c});
  check_argument(grad_perplexity, "grad_perplexity", input, dtype, {n, c});
  check_argument(grad_sparsity, "grad_sparsity", input, dtype, {n, c});
  check_argument(grad_x, "grad_x", input, dtype, input.sizes());
  // The kernels write every element of grad_x once, walking it like x.
  const c10::optional<ResolvedLayout> out_layout =
      grad_x.is_non_overlapping_and_dense() ? in_place_layout(grad_x) : c10::nullopt;
  TORCH_CHECK_VALUE(out_layout.has_value(), "sparsity_ext: grad_x must be dense with its "
                    "positions or its channels unit-stride, got strides ", grad_x.strides());

  BackwardCall call;
  // x is read in grad_x's layout: in place when it has it, else through one copy.
  const c10::optional<ResolvedLayout> x_layout = in_place_layout(input);
  if (x_layout && x_layout->layout == out_layout->layout) {
    call.x = input;
  } else {
    call.x = at::empty_like(grad_x).copy_(input);
  }
  const RowStrides x_strides =
      call.x.is_same(input) ? x_layout->strides : in_place_layout(call.x)->strides;
  call.row_stats = row_stats.contiguous();
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
  p.grad_x = grad_x.mutable_data_ptr();
  p.batch = n;
  p.channels = c;
  p.positions = positions_of(input);
  p.layout = out_layout->layout;
  p.dtype = scalar_kind(dtype);
  p.x_strides = x_strides;
  p.grad_x_strides = out_layout->strides;
  return call;
}

c10::optional<ForwardParams> in_place_input(const at::Tensor& x) {
  const c10::optional<ResolvedLayout> resolved = in_place_layout(x);
  if (!resolved) return c10::nullopt;
  ForwardParams p{};
  p.x = x.const_data_ptr();
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.positions = positions_of(x);
  p.layout = resolved->layout;
  p.dtype = scalar_kind(x.scalar_type());
  p.x_strides = resolved->strides;
  return p;
}

MonitorSumsParams prepare_monitor_sums(at::Tensor& sums, const at::Tensor& x) {
  check_input(x);
  check_dense(sums, "sums");
  TORCH_CHECK(sums.device() == x.device(), "sparsity_ext: all tensors must be on the same "
              "device, but x is on ", x.device(), " and sums is on ", sums.device());
  TORCH_CHECK(!sums.requires_grad(), "sparsity_ext: sums must not require grad "
              "(monitor_sums_ adds into it and is not differentiable)");
  check_argument(sums, "sums", x, at::kDouble, {kMonitorColumns});
  MonitorSumsParams p{};
  p.rows = x.size(0) * x.size(1);
  p.positions = positions_of(x);
  p.acc_dtype = scalar_kind(accumulation_type(x.scalar_type()));
  p.sums = sums.mutable_data_ptr<double>();
  p.sums_stride = sums.stride(0);
  return p;
}

}  // namespace sparsity_ext
