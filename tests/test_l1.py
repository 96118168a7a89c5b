"""The fused L1 ops (torch.ops.sparsity_ext.l1_stats_forward/backward) and the public API
on them (sparsity_ext.channel_stats(x, normalize="l1") and friends) against the float64
reference (reference.channel_stats(x, normalize="l1"), reference.l1_row_stats): values,
row statistics, gradients, layouts, dtypes, dead rows, non-finite input, scale invariance,
bad input, opcheck, torch.compile and determinism. Every input comes from a fixed seed."""

import math

import pytest
import torch

from testing import (DEVICES, DTYPES, assert_close_to_float64, at_thread_counts, compiled,
                     reference, sparsity_ext, with_layout)


OUTPUTS = ("entropy", "perplexity", "sparsity")
SHAPES = [
    (3, 5, 1),           # L = 1
    (2, 3, 2),
    (2, 3, 17),          # odd length: vector tails
    (2, 3, 7, 7),        # 49, the short rows of late conv layers
    (4, 33, 13, 11),     # odd channel count: channels-last vector tails
    (2, 3, 5, 4, 3),     # 3-D
    (2, 2, 8193),        # long rows
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "batch_sliced", "expanded", "permuted"]


def l1_forward(x):
    return torch.ops.sparsity_ext.l1_stats_forward(x)


def l1_backward(x, row_stats, *grads):
    return torch.ops.sparsity_ext.l1_stats_backward(x, row_stats, *grads)


def l1_public(x):
    """The public API: (entropy, perplexity, sparsity), differentiable."""
    return tuple(sparsity_ext.channel_stats(x, normalize="l1"))


def l1_input(shape, dtype, device="cpu", layout="contiguous", dead_rows=True):
    """Normal values (about half of them <= 0, so both branches of the ReLU are exercised),
    with every 5th row dead (all <= 0, zeros included) when `dead_rows`."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    if dead_rows:
        rows = x.view(shape[0] * shape[1], -1)
        rows[::5] = -rows[::5].abs()
        rows[::5, ::3] = 0.0
    return with_layout(x.to(dtype), layout)


def low_precision_l1(x):
    """The L1 measure by plain PyTorch ops in x's own dtype, no upcast: the yard stick for
    half precision, as in test_ops."""
    a = x.flatten(2).clamp_min(0)
    p = a / a.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    perplexity = entropy.exp()
    length = a.shape[-1]
    return entropy, perplexity, (length - perplexity) / (length - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_kernels_are_what_gets_tested(device):
    """Without this every agreement test could pass against a fallback, or not run at all."""
    assert compiled(device)
    for op in ("l1_stats_forward", "l1_stats_backward.out"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsity_ext::{op}",
                                                              device.upper())


# --- values and row statistics --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_float64_reference(device, dtype, shape, layout):
    x = l1_input(shape, dtype, device, layout)
    *ours, row_stats = l1_forward(x)
    exact = reference.channel_stats(x.double(), normalize="l1")
    exact_stats = reference.l1_row_stats(x.double())
    wide = dtype != torch.float64
    for name, a, b in zip(OUTPUTS, ours, exact):
        assert a.shape == shape[:2] and a.dtype == dtype and a.device == x.device
        assert_close_to_float64(a, b, dtype, rtol_acc=1e-5 if wide else 1e-12,
                                atol=1e-6 if wide else 1e-12, what=f"{name} {dtype} {layout}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert row_stats.shape == (4, *shape[:2]) and row_stats.dtype == acc
    for k, name in enumerate(["S", "T/S", "count of x <= 0", "sum of x"]):
        assert_close_to_float64(row_stats[k], exact_stats[k], acc,
                                rtol_acc=1e-5 if wide else 1e-12,
                                atol=1e-5 * exact_stats[0].abs().max().item() if k == 3 else 1e-6,
                                what=f"row_stats {name} {dtype} {layout}")
    assert torch.equal(row_stats[2].double(), exact_stats[2])  # counts are exact
    # The public functions are these ops: the same bits.
    public = sparsity_ext.channel_stats(x, normalize="l1")
    for name, a, b in zip(OUTPUTS, public, ours):
        assert torch.equal(a, b), name
        assert torch.equal(getattr(sparsity_ext, name)(x, normalize="l1"), b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (2, 8, 56, 56), (2, 3, 5000)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_no_worse_than_plain_pytorch_in_that_dtype(device, dtype, shape, layout):
    x = l1_input(shape, dtype, device, layout, dead_rows=False)
    exact = reference.channel_stats(x.double(), normalize="l1")
    ours = l1_forward(x)[:3]
    plain = low_precision_l1(x)
    for name, a, p, e in zip(OUTPUTS, ours, plain, exact):
        ours_error = (a.double() - e).abs().max().item()
        plain_error = (p.double() - e).abs().max().item()
        assert ours_error <= 2 * plain_error + 1e-6, (name, ours_error, plain_error)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sparsity_is_invariant_to_scaling_x(device, layout):
    x = l1_input((4, 16, 9, 9), torch.float32, device, layout)
    sparsity = l1_forward(x)[2]
    for scale in [2.0**-6, 0.37, 3.0, 1000.0]:
        scaled = l1_forward(x * scale)[2]
        torch.testing.assert_close(scaled, sparsity, rtol=0, atol=2e-6)
        exact = reference.sparsity(x.double() * scale, normalize="l1")
        torch.testing.assert_close(exact, reference.sparsity(x.double(), normalize="l1"),
                                   rtol=0, atol=1e-12)
    # The check can fail: the softmax measure on the same rows does move with the scale.
    softmax = reference.sparsity(x.double())
    assert (reference.sparsity(x.double() * 3.0) - softmax).abs().max() > 0.1


# --- gradients ------------------------------------------------------------------------


def _grads_against_reference(x, dtype):
    grads_out = [torch.randn(x.shape[:2], dtype=torch.float64, device=x.device).to(dtype)
                 for _ in OUTPUTS]
    _, _, _, row_stats = l1_forward(x)
    ours = l1_backward(x, row_stats, *grads_out)
    x64 = x.detach().double().requires_grad_(True)
    exact = torch.autograd.grad(reference.channel_stats(x64, normalize="l1"), x64,
                                [g.double() for g in grads_out])[0]
    return ours, exact, _coefficient_scale(x, grads_out)


def _coefficient_scale(x, grads_out):
    """Largest |coef| = |g_H + PP g_PP - PP g_SP / (L - 1)| / S over the live rows: the unit
    of grad_x = coef * (log x - T/S), to which its rounding error is relative (a row with one
    live position has a gradient of exactly 0 up to that rounding)."""
    x64 = x.detach().double()
    s = reference.l1_row_stats(x64)[0]
    pp = reference.perplexity(x64, normalize="l1")
    length = x[0, 0].numel()
    g = [t.double().abs() for t in grads_out]
    coef = (g[0] + pp * g[1] + pp * g[2] / max(length - 1, 1)) / s
    live = s > 0
    return coef[live].max().item() if live.any() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_float64_autograd(device, dtype, shape, layout):
    x = l1_input(shape, dtype, device, layout)
    ours, exact, coef_scale = _grads_against_reference(x, dtype)
    assert ours.shape == x.shape and ours.dtype == dtype and ours.device == x.device
    scale = max(exact.abs().max().item(), coef_scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_to_float64(ours, exact, dtype, rtol_acc=tol, atol=tol * scale,
                            what=f"grad {dtype} {layout}")
    # The ReLU convention: exactly 0 wherever x <= 0 (dead rows included), never NaN.
    assert (ours[x <= 0] == 0).all() and (exact[x <= 0] == 0).all()
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("band", [(-30, 30), (80, 100)], ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 7, 7), (2, 3, 300)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_log_over_the_whole_range_subnormals_included(device, band, shape, layout):
    """The float kernels' log takes x's exponent from its bits (AVX2, subnormals scaled
    first) or getexp (AVX-512). Values +-2^e, e uniform in `band`, and every 7th positive
    one subnormal (2^-149 .. 2^-127): their a log a is negligible in the sums, but the
    gradient, coef * (log x - T/S), shows each element's own log, so both must match the
    float64 reference. (Sums of a log a over values near the largest float overflow in
    float32, and over subnormal values lose their precision: the bands stay clear of both.)"""
    generator = torch.Generator().manual_seed(11)
    exponents = torch.empty(shape, dtype=torch.float64).uniform_(*band, generator=generator)
    signs = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
    x = signs * 2.0 ** exponents
    positive = x.view(-1)[x.view(-1) > 0]  # a copy: written back below
    positive[::7] = 2.0 ** torch.empty(positive[::7].shape, dtype=torch.float64).uniform_(
        -149, -127, generator=generator)
    x.view(-1)[x.view(-1) > 0] = positive
    x = with_layout(x.float().to(device), layout)
    assert (x[x > 0] < torch.finfo(torch.float32).smallest_normal).sum() > 10
    ours = l1_forward(x)[:3]
    exact = reference.channel_stats(x.double(), normalize="l1")
    # H = log S - T/S: both terms near log x, so H's error is absolute, about an ulp of
    # |log x| <= 70 per term.
    tol = 1e-6 * max(abs(e) for e in band)
    for name, value, want in zip(OUTPUTS, ours, exact):
        assert_close_to_float64(value, want, torch.float32, rtol_acc=tol, atol=tol, what=name)
    assert_gradient_per_row_within(x, rtol=LOG_GRAD_RTOL)


# Measured: at most 2.1e-5 on these inputs (T/S of rows whose logs span -100 .. 70, summed
# in float). A subnormal's exponent taken as a normal one's (off by 16 in log x) or a log
# wrong by 0.05 fails it; the polynomial's accuracy is test_forward_matches_float64_reference's.
LOG_GRAD_RTOL = 1e-4


def assert_gradient_per_row_within(x, rtol):
    """grad = coef * (log x - T/S) in each row: its float error is relative to |coef| times
    the size of the logs (up to about 100 for subnormal x), so it is bounded per element by
    rtol |coef| (|log x| + max |log x| of the row) rather than by the largest |grad|."""
    grads_out = [torch.randn(x.shape[:2], dtype=torch.float64).to(x) for _ in OUTPUTS]
    ours = l1_backward(x, l1_forward(x)[3], *grads_out)
    x64 = x.detach().double().requires_grad_(True)
    exact, = torch.autograd.grad(reference.channel_stats(x64, normalize="l1"), x64,
                                 [g.double() for g in grads_out])
    x64 = x64.detach()
    length = x[0, 0].numel()
    pp = reference.perplexity(x64, normalize="l1")
    g = [t.double().abs() for t in grads_out]
    coef = (g[0] + pp * g[1] + pp * g[2] / (length - 1)) / reference.l1_row_stats(x64)[0]
    log_size = torch.where(x64 > 0, x64.clamp_min(1e-320).log().abs(), 0.0)
    row_size = log_size.flatten(2).amax(-1)
    shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    bound = rtol * (coef * row_size).view(shape) + rtol * coef.view(shape) * log_size
    error = (ours.double() - exact).abs()
    assert (error <= bound).all(), f"worst error/bound {(error / bound).max().item():.3g}"


def _away_from_zero(shape, layout):
    """float64 values with |x| >= 0.1: finite differences never step across the kink at 0."""
    x = torch.randn(shape, dtype=torch.float64)
    return with_layout(x.sign() * (0.1 + x.abs()), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_gradcheck_float64_native_and_reference(layout):
    for shape in [(2, 3, 4, 5), (3, 2, 1), (2, 2, 7)]:
        x = _away_from_zero(shape, layout).requires_grad_(True)
        assert torch.autograd.gradcheck(l1_public, (x,))
        assert torch.autograd.gradcheck(
            lambda t: tuple(reference.channel_stats(t, normalize="l1")), (x,))


def test_gradcheck_with_a_dead_row():
    x = _away_from_zero((2, 3, 6), "contiguous")
    x[0, 1] = -x[0, 1].abs()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(l1_public, (x,))
    assert torch.autograd.gradcheck(
        lambda t: tuple(reference.channel_stats(t, normalize="l1")), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_at_exact_zeros_is_zero_and_finite(device, dtype):
    x = torch.randn(3, 4, 6, 6, device=device).abs().to(dtype)
    x[..., ::2, :] = 0.0
    x.requires_grad_(True)
    grads = [torch.randn(3, 4, device=device, dtype=dtype) for _ in OUTPUTS]
    _, _, _, row_stats = l1_forward(x.detach())
    ours = l1_backward(x.detach(), row_stats, *grads)
    exact = torch.autograd.grad(reference.channel_stats(x, normalize="l1"), x, grads)[0]
    for g in (ours, exact):
        assert torch.isfinite(g).all()
        assert (g[..., ::2, :] == 0).all()
        assert (g[..., 1::2, :] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_single_outputs_with_expanded_grad_output(device):
    x = l1_input((3, 4, 6, 5), torch.float32, device).requires_grad_(True)
    for k, name in enumerate(OUTPUTS):
        g = torch.autograd.grad(l1_public(x)[k].sum(), x)[0]  # grad_output of stride 0
        x64 = x.detach().double().requires_grad_(True)
        g64 = torch.autograd.grad(getattr(reference, name)(x64, normalize="l1").sum(), x64)[0]
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6 * g64.abs().max())


def test_channels_last_grad_is_channels_last():
    x = l1_input((2, 16, 5, 6), torch.float32, layout="channels_last")
    _, _, _, row_stats = l1_forward(x)
    g = l1_backward(x, row_stats, *[torch.randn(2, 16) for _ in OUTPUTS])
    assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 1), (2, 2, 7)], ids=str)
def test_reference_derivatives_match_autograd_to_second_order(shape):
    """l1_entropy_derivatives (what double backward and forward mode will be built on)
    against autograd through the reference: gradient, and Hessian times v."""
    x = _away_from_zero(shape, "contiguous")
    x[0, 0] = -x[0, 0].abs()  # a dead row
    x.requires_grad_(True)
    v = torch.randn(shape, dtype=torch.float64)
    entropy, gradient, hvp = reference.l1_entropy_derivatives(x, v)
    auto_entropy = reference.entropy(x, normalize="l1")
    auto_gradient = torch.autograd.grad(auto_entropy.sum(), x, create_graph=True)[0]
    auto_hvp = torch.autograd.grad((auto_gradient * v).sum(), x)[0]
    torch.testing.assert_close(entropy, auto_entropy.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient.view(shape), auto_gradient.detach(), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(hvp.view(shape), auto_hvp, rtol=1e-10, atol=1e-12)
    assert (hvp.view(shape)[0, 0] == 0).all() and (gradient.view(shape)[0, 0] == 0).all()
    if shape[-1] > 1:  # L == 1: H is constant, every derivative 0
        assert (hvp != 0).any()


# --- dead rows, L == 1, non-finite input -----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 20, 7, 7), (2, 3, 8193), (3, 4, 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dead_rows_get_the_uniform_rows_values_and_zero_gradient(device, dtype, shape, layout):
    x = torch.randn(shape, device=device).to(dtype)
    rows = x.view(shape[0] * shape[1], -1)
    dead = torch.zeros(shape[:2], dtype=torch.bool, device=device)
    dead.view(-1)[1::2] = True
    rows[1::2] = -rows[1::2].abs()
    rows[1, :] = 0.0
    rows[3, 0] = float("-inf")
    rows[0::2, 0] = rows[0::2, 0].abs() + 1  # the other rows hold a positive value
    x = with_layout(x, layout)
    entropy, perplexity, sparsity, row_stats = l1_forward(x)
    length = x[0, 0].numel()
    acc = row_stats.dtype
    assert (entropy[dead] == torch.tensor(math.log(length), dtype=acc).to(dtype)).all()
    assert (perplexity[dead] == torch.tensor(float(length)).to(dtype)).all()
    assert (sparsity[dead] == 0).all()
    assert (row_stats[0][dead] == 0).all() and (row_stats[1][dead] == 0).all()
    assert (row_stats[2][dead] == length).all()
    assert torch.isfinite(entropy[~dead]).all() and (row_stats[0][~dead] > 0).all()
    grads = [torch.randn(shape[:2], device=device).to(dtype) for _ in OUTPUTS]
    g = l1_backward(x, row_stats, *grads)
    assert (g[dead] == 0).all()
    # The reference agrees, values and gradient (exactly 0, not NaN) alike.
    exact = reference.channel_stats(x.double(), normalize="l1")
    assert_close_to_float64(entropy[dead], exact.entropy[dead], dtype, what="dead entropy")
    x64 = x.detach().double().requires_grad_(True)
    g64 = torch.autograd.grad(reference.channel_stats(x64, normalize="l1"), x64,
                              [t.double() for t in grads])[0]
    assert (g64[dead] == 0).all() and torch.isfinite(g64).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_position_rows(device, dtype):
    x = torch.randn(4, 6, 1, 1, device=device).to(dtype)
    entropy, perplexity, sparsity, row_stats = l1_forward(x)
    assert (entropy == 0).all() and (perplexity == 1).all() and (sparsity == 0).all()
    g = l1_backward(x, row_stats, *[torch.randn(4, 6, device=device).to(dtype) for _ in OUTPUTS])
    assert (g == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_or_plus_inf_poisons_its_row_only(device, dtype, bad, layout):
    x = l1_input((2, 18, 6, 5), dtype, device, dead_rows=False)
    x[1, 7, 2, 3] = bad
    x = with_layout(x, layout)
    *outputs, row_stats = l1_forward(x)
    poisoned = torch.zeros(2, 18, dtype=torch.bool, device=device)
    poisoned[1, 7] = True
    for out in outputs:
        assert out[poisoned].isnan().all() and torch.isfinite(out[~poisoned]).all()
    assert row_stats[1][poisoned].isnan().all()
    assert bool(row_stats[3][poisoned].isnan().all()) == math.isnan(bad)  # sum of x: NaN or +inf
    exact = reference.channel_stats(x.double(), normalize="l1")
    assert_close_to_float64(outputs[0][~poisoned], exact.entropy[~poisoned], dtype,
                            rtol_acc=1e-5, what="entropy of the clean rows")
    # Gradient: NaN at the row's live positions (x > 0 and the bad one), 0 where x <= 0,
    # exactly as autograd through the reference gives it.
    ours, exact_grad, _ = _grads_against_reference(x, dtype)
    live = ~(x <= 0)
    assert torch.equal(ours.isnan(), exact_grad.isnan())
    assert ours[1, 7][live[1, 7]].isnan().all() and (ours[1, 7][~live[1, 7]] == 0).all()
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1, :7]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_minus_inf_is_just_a_nonpositive_value(device, dtype, layout):
    x = l1_input((2, 18, 6, 5), dtype, device, dead_rows=False)
    mask = torch.rand(x.shape, device=device) < 0.3
    with_zeros = with_layout(x.masked_fill(mask & (x <= 0), 0.0), layout)
    with_inf = with_layout(x.masked_fill(mask & (x <= 0), float("-inf")), layout)
    zeros_out, inf_out = l1_forward(with_zeros), l1_forward(with_inf)
    for a, b in zip(zeros_out[:3], inf_out[:3]):
        assert torch.equal(a, b)
    assert torch.equal(zeros_out[3][:3], inf_out[3][:3])  # S, T/S and the count
    has_inf = (mask & (x <= 0)).flatten(2).any(-1)
    assert (inf_out[3][3][has_inf] == float("-inf")).all()
    grads = [torch.randn(2, 18, device=device).to(dtype) for _ in OUTPUTS]
    g_zeros = l1_backward(with_zeros, zeros_out[3], *grads)
    g_inf = l1_backward(with_inf, inf_out[3], *grads)
    assert torch.equal(g_zeros, g_inf) and torch.isfinite(g_inf).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (0, 0, 5)], ids=str)
def test_empty_batch_or_channels_give_empty_results(device, shape):
    x = torch.randn(shape, device=device)
    *outputs, row_stats = l1_forward(x)
    assert all(o.shape == shape[:2] for o in outputs) and row_stats.shape == (4, *shape[:2])
    g = l1_backward(x, row_stats, *[torch.randn(shape[:2], device=device) for _ in OUTPUTS])
    assert g.shape == shape


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtypes_are_rejected(dtype):
    for f in (l1_forward, l1_public):
        with pytest.raises(TypeError, match="floating-point"):
            f(torch.ones(2, 3, 4, 4).to(dtype))


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 0)], ids=str)
def test_bad_shapes_are_rejected(shape):
    for f in (l1_forward, l1_public, lambda x: reference.channel_stats(x, normalize="l1")):
        with pytest.raises(ValueError, match="spatial"):
            f(torch.randn(shape))


def test_unknown_normalization_is_rejected():
    x = torch.randn(2, 3, 4)
    for f in (reference.channel_stats, sparsity_ext.channel_stats, sparsity_ext.entropy,
              sparsity_ext.perplexity, sparsity_ext.sparsity):
        with pytest.raises(ValueError, match=r"normalize must be one of \('softmax', 'l1'\), "
                                             r"got 'l2'"):
            f(x, normalize="l2")


def test_backward_op_rejects_mismatched_arguments():
    x = torch.randn(2, 3, 4, 4)
    _, _, _, stats = l1_forward(x)
    g = torch.randn(2, 3)
    out = torch.ops.sparsity_ext.l1_stats_backward.out
    grad_x = torch.empty_like(x)
    for backward in (l1_backward, lambda *args: out(*args, grad_x=grad_x)):
        with pytest.raises(ValueError, match=r"row_stats must have shape \[4, 2, 3\]"):
            backward(x, stats[:3], g, g, g)  # a softmax-shaped (3, N, C) row_stats
        with pytest.raises(TypeError, match=r"row_stats must have dtype torch.float32"):
            backward(x, stats.double(), g, g, g)
        with pytest.raises(ValueError, match=r"grad_perplexity must have shape"):
            backward(x, stats, g, torch.randn(3, 2), g)
        with pytest.raises(TypeError, match=r"grad_sparsity must have dtype"):
            backward(x, stats, g, g, g.double())
    with pytest.raises(ValueError, match=r"grad_x must have shape"):
        out(x, stats, g, g, g, grad_x=torch.empty(2, 3, 4))


# --- torch.library, torch.compile, determinism -------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_opcheck(device, dtype, layout):
    x = l1_input((2, 5, 4, 3), dtype, device, layout)
    torch.library.opcheck(torch.ops.sparsity_ext.l1_stats_forward.default, (x,))
    _, _, _, stats = l1_forward(x)
    grads = [torch.randn(2, 5, device=device, dtype=dtype) for _ in OUTPUTS]
    grads[1] = torch.randn(1, 1, device=device, dtype=dtype).expand(2, 5)
    torch.library.opcheck(torch.ops.sparsity_ext.l1_stats_backward.default, (x, stats, *grads))
    torch.library.opcheck(torch.ops.sparsity_ext.l1_stats_backward.out, (x, stats, *grads),
                          {"grad_x": torch.empty_like(x)})


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_backward_out_reads_x_in_grad_x_layout(layout, grad_layout):
    """x in either layout, grad_x in either: the same bits as the functional op."""
    x = l1_input((2, 6, 5, 4), torch.float32, layout=layout)
    stats = l1_forward(x)[3]
    grads = [torch.randn(2, 6) for _ in OUTPUTS]
    expected = l1_backward(x, stats, *grads)
    grad_x = with_layout(torch.full((2, 6, 5, 4), float("nan")), grad_layout)
    torch.ops.sparsity_ext.l1_stats_backward.out(x, stats, *grads, grad_x=grad_x)
    assert torch.equal(grad_x, expected)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def loss_fn(x):
        entropy, _, sparsity = l1_public(x.relu() - 0.1)
        return sparsity.mean() + 0.1 * entropy.mean()

    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    eager_value = loss_fn(x)
    eager_grad = torch.autograd.grad(eager_value, x)[0]
    compiled_fn = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    value = compiled_fn(x)
    grad = torch.autograd.grad(value, x)[0]
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 24, 30, 30), (301, 7, 7, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_every_call_and_every_thread_count(layout, shape, dtype):
    x = l1_input(shape, dtype, layout=layout)
    grads = [torch.randn(shape[:2]).to(dtype) for _ in OUTPUTS]
    def outputs_stats_and_grad():
        *outputs, stats = l1_forward(x)
        return (*outputs, stats, l1_backward(x, stats, *grads))

    threads = torch.get_num_threads()
    results = at_thread_counts([1, threads, 3, max(2, threads)], outputs_stats_and_grad)
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            assert torch.equal(a, b)
    # Without the first sample, the same rows: in the contiguous (301, 7, 7, 7) case each
    # row then sits in another lane of another group of 16 (which the backward walks as one
    # run of vectors, 32 elements a step in bfloat16) and another chunk. Same bits.
    *outputs, stats = l1_forward(x[1:])
    moved = (*outputs, stats, l1_backward(x[1:], stats, *[g[1:] for g in grads]))
    entropy, perplexity, sparsity, stats, grad = results[0]
    wanted = (entropy[1:], perplexity[1:], sparsity[1:], stats[:, 1:], grad[1:])
    assert all(torch.equal(a, b) for a, b in zip(moved, wanted))


def test_float_accumulation_of_long_rows_stays_close():
    """10^5 positions summed in float32: within a few ulps of float64 per output."""
    x = l1_input((1, 2, 100_003), torch.float32, dead_rows=False)
    ours = l1_forward(x)[:3]
    exact = reference.channel_stats(x.double(), normalize="l1")
    for name, a, b in zip(OUTPUTS, ours, exact):
        assert_close_to_float64(a, b, torch.float32, rtol_acc=2e-5, what=name)
