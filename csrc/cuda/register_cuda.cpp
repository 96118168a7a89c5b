// CUDA registration of the channel_stats operators: device checks, device guard, current
// stream, then the torch-free launchers of channel_stats_cuda.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>
#include <tuple>

#include "../launch.h"
#include "channel_stats_cuda.h"
#include "../l1_launch.h"
#include "l1_stats_cuda.h"

namespace sparsity_ext {
namespace {

// Every tensor argument must live on x's CUDA device (the dispatcher picks this kernel as
// soon as one argument is a CUDA tensor, so CPU or other-GPU arguments can arrive here).
void check_same_cuda_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(),
              "sparsity_ext: all tensors must be on the same CUDA device, but x is on ",
              x.device(), " and ", name, " is on ", t.device());
}

// The launchers report launch failures as std::runtime_error; surface them as torch errors.
template <typename Launch>
void run_launch(Launch&& launch) {
  try {
    launch();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_stats_forward_cuda_op(
    const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "sparsity_ext: expected x on a CUDA device, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ForwardCall call = prepare_forward(x);
  if (call.entropy.numel() > 0) {  // N * C == 0: nothing to launch
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { channel_stats_forward_cuda(call.params, stream); });
  }
  return call.outputs();
}

at::Tensor channel_stats_backward_cuda_op(const at::Tensor& x, const at::Tensor& row_stats,
                                          const at::Tensor& grad_entropy,
                                          const at::Tensor& grad_perplexity,
                                          const at::Tensor& grad_sparsity) {
  TORCH_CHECK(x.is_cuda(), "sparsity_ext: all tensors must be on the same CUDA device, but x ",
              "is on ", x.device());
  check_same_cuda_device(x, row_stats, "row_stats");
  check_same_cuda_device(x, grad_entropy, "grad_entropy");
  check_same_cuda_device(x, grad_perplexity, "grad_perplexity");
  check_same_cuda_device(x, grad_sparsity, "grad_sparsity");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity);
  if (call.grad_x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { channel_stats_backward_cuda(call.params, stream); });
  }
  return call.grad_x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> l1_stats_forward_cuda_op(
    const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "sparsity_ext: expected x on a CUDA device, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const L1ForwardCall call = prepare_l1_forward(x);
  if (call.entropy.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { l1_stats_forward_cuda(call.params, stream); });
  }
  return call.outputs();
}

at::Tensor l1_stats_backward_cuda_op(const at::Tensor& x, const at::Tensor& row_stats,
                                     const at::Tensor& grad_entropy,
                                     const at::Tensor& grad_perplexity,
                                     const at::Tensor& grad_sparsity) {
  TORCH_CHECK(x.is_cuda(), "sparsity_ext: all tensors must be on the same CUDA device, but x ",
              "is on ", x.device());
  check_same_cuda_device(x, row_stats, "row_stats");
  check_same_cuda_device(x, grad_entropy, "grad_entropy");
  check_same_cuda_device(x, grad_perplexity, "grad_perplexity");
  check_same_cuda_device(x, grad_sparsity, "grad_sparsity");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const L1BackwardCall call =
      prepare_l1_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity);
  if (call.grad_x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { l1_stats_backward_cuda(call.params, stream); });
  }
  return call.grad_x;
}

}  // namespace
}  // namespace sparsity_ext

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) {
  m.impl("channel_stats_forward", &sparsity_ext::channel_stats_forward_cuda_op);
  m.impl("channel_stats_backward", &sparsity_ext::channel_stats_backward_cuda_op);
  m.impl("l1_stats_forward", &sparsity_ext::l1_stats_forward_cuda_op);
  m.impl("l1_stats_backward", &sparsity_ext::l1_stats_backward_cuda_op);
}
