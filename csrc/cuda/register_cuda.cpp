// CUDA kernels of the channel_stats and l1_stats operators: host checks (host_prepare), device guard,
// current stream, then the torch-free launchers of channel_stats_cuda.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>
#include <tuple>

#include "../host_prepare.h"
#include "channel_stats_cuda.h"
#include "l1_stats_cuda.h"
#include "../l1_stats_params.h"

namespace sparsity_ext {
namespace {

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

// Every tensor argument must be on x's device: prepare_backward checks it before any launch.
void channel_stats_backward_cuda_op(const at::Tensor& x, const at::Tensor& row_stats,
                                     const at::Tensor& grad_entropy,
                                     const at::Tensor& grad_perplexity,
                                     const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity, grad_x);
  const c10::cuda::CUDAGuard device_guard(grad_x.device());
  if (grad_x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { channel_stats_backward_cuda(call.params, stream); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> l1_stats_forward_cuda_op(
    const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "sparsity_ext: expected x on a CUDA device, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ForwardCall call = prepare_forward(x, kL1Stats);
  if (call.entropy.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { l1_stats_forward_cuda(call.params, stream); });
  }
  return call.outputs();
}

void l1_stats_backward_cuda_op(const at::Tensor& x, const at::Tensor& row_stats,
                               const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                               const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call = prepare_backward(x, row_stats, grad_entropy, grad_perplexity,
                                             grad_sparsity, grad_x, kL1Stats);
  const c10::cuda::CUDAGuard device_guard(grad_x.device());
  if (grad_x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_launch([&] { l1_stats_backward_cuda(call.params, stream); });
  }
}

}  // namespace
}  // namespace sparsity_ext

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) {
  m.impl("channel_stats_forward", &sparsity_ext::channel_stats_forward_cuda_op);
  m.impl("channel_stats_backward.out", &sparsity_ext::channel_stats_backward_cuda_op);
  m.impl("l1_stats_forward", &sparsity_ext::l1_stats_forward_cuda_op);
  m.impl("l1_stats_backward.out", &sparsity_ext::l1_stats_backward_cuda_op);
}
