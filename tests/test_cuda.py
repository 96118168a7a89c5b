"""The CUDA kernels: agreement with the float64 reference over every dtype, layout and row
length regime (teams, block per row, clusters, scalar and 16-byte loads), gradients, the
non-finite semantics of the CPU path, streams, CUDA graphs, autocast, torch.compile,
determinism, peak memory and tensors beyond 2^31 elements; all skipped without a GPU,
except test_kernel_thread_logic_on_the_host, which needs only nvcc.

`tests/run_compute_sanitizer.sh` runs this file under compute-sanitizer memcheck with
SPARSITY_EXT_SANITIZER=1, which keeps the shapes small and skips what memcheck makes slow.
"""

import math
import os
import subprocess

import pytest
import torch

from testing import (ROUNDING, assert_close_to_float64, compiled, low_precision_reference,
                     random_input, reference, sparsity_ext, with_layout)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

UNDER_SANITIZER = os.environ.get("SPARSITY_EXT_SANITIZER", "") not in ("", "0")
not_under_sanitizer = pytest.mark.skipif(UNDER_SANITIZER, reason="too slow under memcheck")
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 (tests/run_compute_sanitizer.sh) makes every tensor its
# own cudaMalloc, which stream capture forbids: graph capture then fails in PyTorch's
# allocator before any kernel of ours runs (seen on an H200, 2026-12-04).
needs_caching_allocator = pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "") not in ("", "0"),
    reason="CUDA graph capture needs PyTorch's caching allocator")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUTPUTS = ("entropy", "perplexity", "sparsity")

# Each row-length regime of the kernels (see the notes atop csrc/cuda/channel_stats_cuda.cu).
SHAPES = [
    (2, 3, 7, 7),          # 49 positions: teams of a few lanes, element loads
    (4, 33, 13, 11),       # odd channel count: channels-last element loads
    (3, 5, 1000),          # a 32-lane team per row, 16-byte loads
    (2, 16, 8, 14, 14),    # 3-D (channels_last_3d), 1568 positions: a block per row
    (2, 3, 5003),          # block per row, element loads, odd length
    (1, 2, 300_000),       # few long rows: clusters of blocks per row on sm_90
    (64, 64, 56, 56),      # the ResNet stage-1 activation
]
# Layouts read in place (both kernels' stride handling), misaligned ones (element-load
# fallback) and one that takes a contiguous copy.
LAYOUTS = ["contiguous", "channels_last_format", "sliced", "batch_sliced", "expanded",
           "channels_last_batch_sliced", "misaligned", "channels_last_misaligned", "permuted"]
# Under memcheck: smaller shapes with the same regimes (the long rows still take clusters),
# every path once in test_every_kernel_path_is_memory_safe, and fewer reference comparisons.
SANITIZER_SHAPES = [(2, 3, 7, 7), (4, 33, 13, 11), (3, 5, 1000), (2, 16, 4, 6, 6), (2, 3, 5003),
                    (1, 2, 100_000)]
if UNDER_SANITIZER:
    AGREEMENT = dict(dtypes=[torch.bfloat16, torch.float32], shapes=SANITIZER_SHAPES,
                     layouts=["contiguous", "channels_last_format", "misaligned"])
else:
    AGREEMENT = dict(dtypes=DTYPES, shapes=SHAPES, layouts=LAYOUTS)


def cuda_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (on its device) stored in `layout`."""
    if layout == "channels_last_format":
        # torch's own channels_last / channels_last_3d; the 3-D analogue for (N, C, L).
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        return x.contiguous(memory_format=fmt) if fmt else with_layout(x, "channels_last")
    if layout in ("misaligned", "channels_last_misaligned"):
        # One element past an allocation's start: never 16-byte aligned.
        dense = with_layout(x, "contiguous" if layout == "misaligned" else "channels_last")
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = storage[1:].as_strided(dense.shape, dense.stride())
        view.copy_(dense)
        return view
    return with_layout(x, layout)


def cuda_input(shape, dtype, layout="contiguous", **kwargs):
    return cuda_layout(random_input(shape, dtype, "cuda", **kwargs), layout)


def max_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return (ours.double() - exact).abs().max().item()


def yardstick_error(plain: torch.Tensor, exact: torch.Tensor) -> float:
    """Error of plain PyTorch in half precision; where that overflows (long rows in
    float16 give NaN) it sets no yard stick, leaving the one-rounding allowance."""
    error = max_error(plain, exact)
    return error if math.isfinite(error) else 0.0


def _forward_backward(x, grads_out):
    """The three outputs and d(sum_k <output_k, grads_out_k>)/dx."""
    out = sparsity_ext.channel_stats(x)
    loss = sum((o * g).sum() for o, g in zip(out, grads_out))
    return (*out, torch.autograd.grad(loss, x)[0])


@needs_gpu
def test_the_cuda_kernel_is_what_gets_tested():
    """Without this every test below could pass against the pure-PyTorch fallback."""
    assert compiled("cuda"), sparsity_ext._extension.load().describe()


def _nvcc():
    home = sparsity_ext._extension.cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


@not_under_sanitizer
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (set CUDA_HOME)")
def test_kernel_thread_logic_on_the_host(tmp_path):
    """No GPU needed: the kernels' per-thread code and launch plans, run thread by thread on
    the host against a float64 reference (csrc/cuda/channel_stats_cuda_host_test.cu)."""
    source = sparsity_ext._extension.csrc_dir() / "cuda" / "channel_stats_cuda_host_test.cu"
    program = tmp_path / "channel_stats_cuda_host_test"
    build = subprocess.run([_nvcc(), "-std=c++17", "-O1", "-arch=sm_80", str(source), "-o",
                            str(program)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all host checks passed" in run.stdout, run.stdout + run.stderr


# --- values and gradients against float64 -----------------------------------------------


# float16 takes the same load widths as bfloat16: left out under memcheck.
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[1:] if UNDER_SANITIZER else DTYPES)
@pytest.mark.parametrize("shape", SANITIZER_SHAPES if UNDER_SANITIZER else SHAPES[:-1], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[:-1])
def test_every_kernel_path_is_memory_safe(dtype, shape, layout):
    """Forward and backward on every layout/dtype/regime with finite, sane results: the
    sweep compute-sanitizer checks (tests/run_compute_sanitizer.sh)."""
    x = cuda_input(shape, dtype, layout).requires_grad_(True)
    grads_out = [torch.ones(shape[:2], device="cuda", dtype=dtype) for _ in OUTPUTS]
    *outputs, grad = _forward_backward(x, grads_out)
    length = x[0, 0].numel()
    assert all(torch.isfinite(o).all() for o in outputs) and torch.isfinite(grad).all()
    assert (outputs[0] >= 0).all() and (outputs[0] <= math.log(length) * 1.01).all()
    assert grad.shape == x.shape


@needs_gpu
@pytest.mark.parametrize("dtype", AGREEMENT["dtypes"])
@pytest.mark.parametrize("shape", AGREEMENT["shapes"], ids=str)
@pytest.mark.parametrize("layout", AGREEMENT["layouts"])
def test_forward_matches_float64_reference(dtype, shape, layout):
    x = cuda_input(shape, dtype, layout)
    ours = sparsity_ext.channel_stats(x)
    exact = reference.channel_stats(x.double())
    plain = low_precision_reference(x) if dtype in (torch.float16, torch.bfloat16) else None
    for k, (name, a, e) in enumerate(zip(OUTPUTS, ours, exact)):
        assert a.shape == shape[:2] and a.dtype == dtype and a.device == x.device
        if plain is None:
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert_close_to_float64(a, e, dtype, rtol_acc=tol, atol=tol,
                                    what=f"{name} {dtype} {layout}")
        else:
            # flash-attention's yard stick: at most 2x the error of plain PyTorch in that
            # dtype, plus one rounding of the largest value.
            ours_error, plain_error = max_error(a, e), yardstick_error(plain[k], e)
            slack = ROUNDING[dtype] * e.abs().max().item()
            assert ours_error <= 2 * plain_error + slack, (name, ours_error, plain_error)


def _loss_grads(x):
    return [torch.randn(x.shape[:2], dtype=torch.float64, device=x.device).to(x.dtype)
            for _ in OUTPUTS]


def _grad(fn, x, grads_out):
    xr = x.detach().requires_grad_(True)
    return torch.autograd.grad(fn(xr), xr, grads_out)[0]


@needs_gpu
@pytest.mark.parametrize("dtype", AGREEMENT["dtypes"])
@pytest.mark.parametrize("shape", AGREEMENT["shapes"], ids=str)
@pytest.mark.parametrize("layout", AGREEMENT["layouts"])
def test_backward_matches_float64_autograd(dtype, shape, layout):
    x = cuda_input(shape, dtype, layout)
    grads_out = _loss_grads(x)  # the same grad_out for ours and the references
    ours = _grad(sparsity_ext.channel_stats, x, grads_out)
    exact = _grad(reference.channel_stats, x.double(), [g.double() for g in grads_out])
    assert ours.shape == x.shape and ours.dtype == dtype and ours.device == x.device
    scale = exact.abs().max().item()
    if dtype in (torch.float16, torch.bfloat16):
        plain = _grad(lambda t: tuple(low_precision_reference(t)), x, grads_out)
        ours_error, plain_error = max_error(ours, exact), yardstick_error(plain, exact)
        assert ours_error <= 3 * plain_error + ROUNDING[dtype] * scale, (ours_error, plain_error)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close_to_float64(ours, exact, dtype, rtol_acc=tol, atol=tol * scale + 1e-30,
                                what=f"grad {dtype} {layout}")


@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_format", "expanded"])
def test_grad_x_keeps_the_layout_x_was_read_in(layout):
    x = cuda_input((2, 16, 5, 6), torch.float32, layout).requires_grad_(True)
    g = torch.autograd.grad(sparsity_ext.entropy(x).sum(), x)[0]
    if layout == "channels_last_format":
        assert g.is_contiguous(memory_format=torch.channels_last)
    else:
        assert g.is_contiguous()


@needs_gpu
@pytest.mark.parametrize("name", OUTPUTS)
def test_single_outputs_with_expanded_grad_output(name):
    """`.sum()` hands the backward stride-0 grads; the other two grads are zeros."""
    x = cuda_input((3, 4, 30, 30), torch.float32).requires_grad_(True)
    ours = getattr(sparsity_ext, name)(x)
    torch.testing.assert_close(ours.double(), getattr(reference, name)(x.detach().double()),
                               rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(ours.sum(), x)[0]
    x64 = x.detach().double().requires_grad_(True)
    g64 = torch.autograd.grad(getattr(reference, name)(x64).sum(), x64)[0]
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


@needs_gpu
@not_under_sanitizer
def test_gradcheck_float64():
    for shape, layout in [((2, 3, 4, 5), "contiguous"), ((2, 4, 4, 5), "channels_last_format"),
                          ((1, 2, 3000), "contiguous"), ((3, 2, 1), "misaligned")]:
        x = cuda_input(shape, torch.float64, layout).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: tuple(sparsity_ext.channel_stats(t)), (x,))


# --- non-finite input: the same results as the CPU kernel --------------------------------


def _non_finite_rows(shape, dtype):
    x = random_input(shape, dtype, "cpu")
    x[0, 0].view(-1)[::3] = float("-inf")   # masked positions
    x[0, 1] = float("-inf")                  # only -inf: NaN
    x[0, 2].view(-1)[-1] = float("nan")
    x[1, 0].view(-1)[0] = float("inf")
    x[1, 1] = float("-inf")
    x[1, 1].view(-1)[5] = 3.0                # one finite position: a one-hot softmax
    x[1, 2] += 1e4                           # far from zero
    return x


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 7, 7), (2, 8, 40, 40), (2, 3, 20_000)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
def test_non_finite_semantics_match_the_cpu_kernel(dtype, shape, layout):
    host = _non_finite_rows(shape, dtype)
    x = cuda_layout(host.cuda(), layout).requires_grad_(True)
    xc = host.clone().requires_grad_(True)
    ours, cpu = sparsity_ext.channel_stats(x), sparsity_ext.channel_stats(xc)
    exact = reference.channel_stats(host.double())
    for a, c, e in zip(ours, cpu, exact):
        assert torch.equal(a.isnan().cpu(), e.isnan()) and torch.equal(c.isnan(), e.isnan())
        torch.testing.assert_close(a.cpu(), c, rtol=4 * ROUNDING[dtype] + 1e-5, atol=1e-5,
                                   equal_nan=True)
    assert ours.entropy[1, 1].item() == 0.0 and ours.sparsity[1, 1].item() == 1.0
    grads_out = [torch.randn(shape[:2], dtype=torch.float64).to(dtype) for _ in OUTPUTS]
    g = torch.autograd.grad(ours, x, [t.cuda() for t in grads_out])[0].cpu()
    gc = torch.autograd.grad(cpu, xc, grads_out)[0]
    assert torch.equal(g.isnan(), gc.isnan())
    finite_rows = torch.isfinite(exact.entropy)
    masked = (host == float("-inf")) & finite_rows.view(*shape[:2], *[1] * (len(shape) - 2))
    assert (g[masked] == 0).all()  # masked positions: exactly zero gradient
    scale = gc.nan_to_num().abs().max().item()
    torch.testing.assert_close(g, gc, rtol=4 * ROUNDING[dtype] + 1e-5,
                               atol=4 * ROUNDING[dtype] * scale, equal_nan=True)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_position_rows(dtype):
    x = cuda_input((4, 6, 1, 1), dtype).requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    assert (stats.entropy == 0).all() and (stats.perplexity == 1).all()
    assert (stats.sparsity == 0).all()
    assert (torch.autograd.grad(sum(o.sum() for o in stats), x)[0] == 0).all()


@needs_gpu
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (0, 0, 5)], ids=str)
def test_empty_batch_or_channels(shape):
    x = torch.randn(shape, device="cuda")
    entropy, perplexity, sparsity, stats = torch.ops.sparsity_ext.channel_stats_forward(x)
    assert entropy.shape == shape[:2] and stats.shape == (3, *shape[:2])
    g = torch.zeros(shape[:2], device="cuda")
    grad = torch.ops.sparsity_ext.channel_stats_backward(x, stats, g, g, g)
    assert grad.shape == x.shape and grad.device == x.device


@needs_gpu
def test_op_outputs_and_row_stats():
    x = cuda_input((3, 4, 9, 9), torch.bfloat16)
    entropy, perplexity, sparsity, stats = torch.ops.sparsity_ext.channel_stats_forward(x)
    assert stats.dtype == torch.float32 and stats.shape == (3, 3, 4) and stats.is_cuda
    rows = x.double().flatten(2)
    torch.testing.assert_close(stats[0].double(), rows.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(stats[1].double(), (rows - rows.amax(-1, keepdim=True))
                               .exp().sum(-1).log(), rtol=1e-5, atol=1e-6)


@needs_gpu
def test_mismatched_devices_are_rejected():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    _, _, _, stats = torch.ops.sparsity_ext.channel_stats_forward(x)
    g = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.sparsity_ext.channel_stats_backward(x, stats, g.cpu(), g, g)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.sparsity_ext.channel_stats_backward(x, stats.cpu(), g, g, g)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_runs_on_the_tensors_device():
    x = random_input((2, 8, 9, 9), torch.float32, "cuda:1").requires_grad_(True)
    with torch.cuda.device(0):
        stats = sparsity_ext.channel_stats(x)
        g = torch.autograd.grad(stats.entropy.sum(), x)[0]
    assert stats.entropy.device == x.device and g.device == x.device
    torch.testing.assert_close(stats.entropy.double(), reference.entropy(x.detach().double()),
                               rtol=1e-5, atol=1e-6)


# --- good citizenship: streams, graphs, autocast, compile, opcheck ------------------------


@needs_gpu
def test_runs_on_the_current_stream():
    """x is written on a side stream after a long sleep; an op that ignored the current
    stream would read it before the write lands."""
    src = random_input((16, 32, 28, 28), torch.float32, "cuda")
    expected = sparsity_ext.channel_stats(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.zeros_like(src)
        torch.cuda._sleep(100_000_000)  # ~0.1 s of GPU cycles ahead of the copy
        x.copy_(src)
        ours = sparsity_ext.channel_stats(x)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,layout", [
    ((8, 16, 7, 7), "contiguous"),
    ((4, 8, 30, 30), "channels_last_format"),
    ((1, 2, 300_000), "contiguous"),        # clustered launch on sm_90
    ((1, 8, 128, 128), "channels_last_format"),
], ids=str)
@needs_gpu
@needs_caching_allocator
def test_cuda_graph_capture_and_replay(shape, layout):
    x = cuda_input(shape, torch.float32, layout).requires_grad_(True)
    grads_out = [torch.randn(shape[:2], device="cuda") for _ in OUTPUTS]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (autograd, allocator)
        for _ in range(3):
            _forward_backward(x, grads_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _forward_backward(x, grads_out)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(random_input(shape, torch.float32, "cuda"))
            for g in grads_out:
                g.copy_(torch.randn_like(g))
        graph.replay()
        eager = _forward_backward(x, grads_out)
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)


@needs_gpu
def test_autocast_conv_then_sparsity():
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).cuda()
    x = torch.randn(8, 3, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
        ours = sparsity_ext.sparsity(y)
    assert y.dtype == torch.bfloat16 and ours.is_cuda and ours.shape == (8, 16)
    exact = reference.sparsity(y.detach().double())
    assert max_error(ours, exact) <= 2 * ROUNDING[torch.bfloat16] * exact.abs().max().item() + 1e-3
    g_ours = torch.autograd.grad(ours.float().sum(), conv.weight)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = reference.sparsity(conv(x))
    g_plain = torch.autograd.grad(plain.float().sum(), conv.weight)[0]
    assert g_ours.dtype == conv.weight.dtype and torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours, g_plain, rtol=5e-2, atol=5e-2 * g_plain.abs().max().item())


@needs_gpu
@not_under_sanitizer
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compile_fullgraph_forward_and_backward(backend, memory_format):
    if backend == "inductor":
        pytest.importorskip("triton")
    torch._dynamo.reset()

    def loss_fn(x, w):
        y = torch.nn.functional.conv2d(x, w, padding=1).relu()
        stats = sparsity_ext.channel_stats(y)
        return stats.sparsity.mean() + 0.1 * stats.entropy.mean() + 1e-3 * stats.perplexity.sum()

    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=backend)
    x = torch.randn(4, 3, 20, 20, device="cuda").contiguous(memory_format=memory_format)
    w = torch.randn(8, 3, 3, 3, device="cuda", requires_grad=True)
    eager_value = loss_fn(x, w)
    eager_grad = torch.autograd.grad(eager_value, w)[0]
    value = compiled_loss(x, w)
    grad = torch.autograd.grad(value, w)[0]
    torch.testing.assert_close(value, eager_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


@needs_gpu
@not_under_sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "misaligned"])
def test_opcheck(dtype, layout):
    x = cuda_input((2, 5, 4, 3), dtype, layout)
    torch.library.opcheck(torch.ops.sparsity_ext.channel_stats_forward.default, (x,))
    _, _, _, stats = torch.ops.sparsity_ext.channel_stats_forward(x)
    grads = [torch.randn(2, 5, device="cuda", dtype=dtype) for _ in OUTPUTS]
    grads[1] = torch.randn(1, 1, device="cuda", dtype=dtype).expand(2, 5)
    torch.library.opcheck(torch.ops.sparsity_ext.channel_stats_backward.default,
                          (x, stats, *grads))


# --- determinism and memory -------------------------------------------------------------


@pytest.mark.parametrize("shape,layout,dtype", [
    ((16, 64, 7, 7), "contiguous", torch.float32),
    ((2, 16, 3000), "contiguous", torch.float16),
    ((1, 2, 300_000), "contiguous", torch.float32),          # clusters
    ((4, 64, 56, 56), "channels_last_format", torch.bfloat16),  # channels-last clusters
    ((3, 7, 5003), "misaligned", torch.float64),
], ids=str)
@needs_gpu
def test_same_bits_every_call(shape, layout, dtype):
    x = cuda_input(shape, dtype, layout).requires_grad_(True)
    grads_out = [torch.randn(shape[:2], device="cuda").to(dtype) for _ in OUTPUTS]
    first = _forward_backward(x, grads_out)
    for _ in range(2):
        again = _forward_backward(x, grads_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)  # finite input: equal values are equal bits


@needs_gpu
@not_under_sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_format", "batch_sliced"])
def test_peak_memory_of_forward_and_backward_is_grad_x_plus_rows(dtype, layout):
    x = cuda_input((64, 64, 56, 56), dtype, layout).requires_grad_(True)
    grads_out = [torch.randn(x.shape[:2], device="cuda").to(dtype) for _ in OUTPUTS]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _, _, _, grad = _forward_backward(x, grads_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    rows = x.shape[0] * x.shape[1]
    # Outputs, row_stats, the loss's products and grads: a few dozen bytes per row, each
    # allocation rounded up to 512 bytes. A float32 copy of x or a stored softmax would be
    # megabytes more.
    assert extra <= grad.nbytes + 128 * rows + 64 * 1024, (extra, grad.nbytes)


# --- beyond 2^31 elements ---------------------------------------------------------------


@needs_gpu
@pytest.mark.slow
@not_under_sanitizer
def test_more_than_2_31_elements_in_short_rows():
    """(2^16 + 1, 64, 16, 32) bf16, 4.3 GB: every sample is one of three patterns, so the
    expected result of every row is known from the patterns alone."""
    patterns = random_input((3, 64, 16, 32), torch.bfloat16, "cuda")
    n = 2**16 + 1
    x = torch.empty((n, 64, 16, 32), dtype=torch.bfloat16, device="cuda")
    for k in range(3):
        x[k::3] = patterns[k]
    assert x.numel() > 2**31
    x.requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    small = sparsity_ext.channel_stats(patterns)
    exact = reference.channel_stats(patterns.double())
    for k in range(3):
        for big, want in zip(stats, small):
            # Same row length, same work mapping: the same bits for every copy of a pattern.
            assert torch.equal(big[k::3], want[k].expand_as(big[k::3]))
    for a, e in zip(small, exact):
        assert max_error(a, e) <= 2 * ROUNDING[torch.bfloat16] * e.abs().max().item()
    ones = torch.ones((1, 1), dtype=torch.bfloat16, device="cuda")
    zeros = torch.zeros((1, 1), dtype=torch.bfloat16, device="cuda")
    grad = torch.autograd.grad(stats, x, [ones.expand(n, 64), zeros.expand(n, 64),
                                          zeros.expand(n, 64)])[0]
    del stats
    small_grad = torch.autograd.grad(sparsity_ext.channel_stats(patterns.requires_grad_(True)),
                                     patterns, [ones.expand(3, 64), zeros.expand(3, 64),
                                                zeros.expand(3, 64)])[0]
    for k in range(3):
        assert torch.equal(grad[k::3], small_grad[k].expand_as(grad[k::3]))
    assert grad[-1].abs().sum() > 0  # the last sample (past 2^31 elements) was written


def _chunked_float64_stats(rows: torch.Tensor, chunk: int = 2**26):
    """Entropy, perplexity, sparsity, max, log-sum, mean-shift of each long row, summed in
    float64 chunk by chunk (a float64 copy of the whole tensor would need 17 GB)."""
    m = rows.amax(-1).double()
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    for start in range(0, rows.shape[-1], chunk):
        d = rows[:, start:start + chunk].double() - m[:, None]
        e = d.exp()
        s += e.sum(-1)
        t += (d * e).sum(-1)
    log_s, mean_shift = s.log(), t / s
    entropy = log_s - mean_shift
    length = rows.shape[-1]
    return entropy, entropy.exp(), (length - entropy.exp()) / (length - 1), m, log_s, mean_shift


@needs_gpu
@pytest.mark.slow
@not_under_sanitizer
def test_more_than_2_31_elements_in_two_long_rows():
    """(2, 1, 2^30 + 7) bf16: the second row starts past 2^30 elements and ends past 2^31;
    an odd length takes element loads, and sm_90 splits each row over a cluster."""
    length = 2**30 + 7
    x = torch.randn((2, 1, length), dtype=torch.bfloat16, device="cuda")
    x[1, 0, -1] = 12.0  # a clear maximum at the very last element
    assert x.numel() > 2**31
    x.requires_grad_(True)
    ours = sparsity_ext.channel_stats(x)
    entropy, perplexity, sparsity, m, log_s, mean_shift = _chunked_float64_stats(x.detach()[:, 0])
    for a, e in zip(ours, (entropy, perplexity, sparsity)):
        assert max_error(a[:, 0], e) <= 2 * ROUNDING[torch.bfloat16] * e.abs().max().item() + 1e-6
    ones = torch.ones((1, 1), dtype=torch.bfloat16, device="cuda").expand(2, 1)
    zeros = torch.zeros((1, 1), dtype=torch.bfloat16, device="cuda").expand(2, 1)
    grad = torch.autograd.grad(ours, x, [ones, zeros, zeros])[0]
    # dH/dx_i = -p_i (x_i - mu) on a few slices, including the very end.
    for row in range(2):
        for start in (0, length // 2, length - 4096):
            xs = x.detach()[row, 0, start:start + 4096].double()
            shift = xs - m[row]
            want = -(shift - log_s[row]).exp() * (shift - mean_shift[row])
            got = grad[row, 0, start:start + 4096].double()
            scale = want.abs().max().item()
            assert max_error(got, want) <= 4 * ROUNDING[torch.bfloat16] * scale + 1e-30
