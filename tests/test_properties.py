"""Property-based tests (hypothesis, derandomized: the same examples every run) of the fused
operator against the float64 reference, special rows included, plus large strided views
and concurrent use from Python threads."""

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testing import ROUNDING, assert_close_to_float64, compiled, reference, sparsity_ext

EXAMPLES = 400
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def activation(draw):
    """A random (N, C, *S) tensor: shape, layout, dtype, magnitude, -inf masks and NaNs."""
    spatial_dims = draw(st.integers(1, 3))
    long_row = draw(st.booleans()) and spatial_dims == 1
    spatial = ([draw(st.integers(1, 70_000))] if long_row
               else [draw(st.integers(1, 9)) for _ in range(spatial_dims)])
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 40 if not long_row else 2))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 10.0, 60.0]))
    offset = draw(st.sampled_from([0.0, -50.0, 1e3, 3e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=g, dtype=torch.float64) * scale + offset
    if dtype in (torch.float16,):
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    if draw(st.booleans()):  # mask part of the positions of some rows
        mask = torch.rand(x.shape, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.95]))
        x = x.masked_fill(mask, float("-inf"))
    nan_rows = draw(st.sampled_from([0, 0, 1]))
    for _ in range(nan_rows):
        idx = tuple(int(torch.randint(s, (1,), generator=g)) for s in x.shape)
        x[idx] = float("nan")
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "batch_step"]))
    if layout == "channels_last":
        perm = [0, *range(2, x.dim()), 1]
        x = x.permute(perm).contiguous().permute([0, x.dim() - 1, *range(1, x.dim() - 1)])
    elif layout == "transposed" and x.dim() >= 4:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "batch_step":
        x = torch.cat([x, x], 0)[::2]
    return x


def _relative_bound(dtype):
    # Values far from zero (offset 3e4) lose digits when rounded to dtype before the op;
    # the reference gets the same rounded input, so only accumulation error remains.
    return 1e-12 if dtype == torch.float64 else 3e-5


@SETTINGS
@given(x=activation())
def test_forward_property(x):
    assert compiled("cpu")
    ours = sparsity_ext.channel_stats(x)
    exact = reference.channel_stats(x.double())
    for name, a, b in zip(("entropy", "perplexity", "sparsity"), ours, exact):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert_close_to_float64(a, b, x.dtype, rtol_acc=_relative_bound(x.dtype),
                                atol=1e-5 if x.dtype != torch.float64 else 1e-12, what=name)
    finite = ~exact.entropy.isnan()
    length = x.shape[2:].numel()
    ent = ours.entropy.double()[finite]
    tol = ROUNDING[x.dtype] * 4 + 1e-5
    log_length = torch.log(torch.tensor(float(length), dtype=torch.float64))
    assert (ent >= 0).all() and (ent <= log_length * (1 + tol) + tol).all()


@SETTINGS
@given(x=activation())
def test_backward_property(x):
    x = x.detach()
    grads = [torch.randn(x.shape[:2], dtype=torch.float64).to(x.dtype) for _ in range(3)]
    xr = x.clone().requires_grad_(True) if not x.is_contiguous() else x.requires_grad_(True)
    ours = torch.autograd.grad(tuple(sparsity_ext.channel_stats(xr)), xr, grads)[0]
    x64 = x.double().requires_grad_(True)
    exact = torch.autograd.grad(tuple(reference.channel_stats(x64)), x64,
                                [g.double() for g in grads])[0]
    # Rows with NaN, +inf or only -inf: NaN at every position, in both (reference.py).
    nan_rows = reference.channel_stats(x.double()).entropy.isnan()
    poisoned = nan_rows[(...,) + (None,) * (x.dim() - 2)].expand_as(x)
    assert torch.equal(ours.isnan(), poisoned) and torch.equal(exact.isnan(), poisoned)
    keep = ~poisoned
    # Absolute error scale of any evaluation of dH/dx_i = -p_i (x_i - mu): the O(1) terms
    # that cancel are |grad_out| times the spread of the finite values.
    finite = x.double()[torch.isfinite(x)]
    spread = (finite.max() - finite.min()).item() if finite.numel() else 0.0
    unit = max(g.abs().max().item() for g in grads) * max(1.0, spread)
    tol = 1e-11 if x.dtype == torch.float64 else 2e-5
    assert_close_to_float64(ours[keep], exact[keep], x.dtype, rtol_acc=tol, atol=tol * unit,
                            what="grad")
    masked = (x == float("-inf")) & keep
    assert (ours[masked] == 0).all()


SPECIAL = [0.0, 1.0, -2.5, 30.0, float("-inf"), float("inf"), float("nan")]


@SETTINGS
@given(data=st.data())
def test_special_rows_fused_and_reference_agree(data):
    """Short rows built from finite values, -inf, +inf and NaN, L = 1 included: the same
    values, and the same gradients (NaN exactly where the reference has NaN)."""
    dtype = data.draw(st.sampled_from(DTYPES))
    length = data.draw(st.integers(1, 6))
    channels = data.draw(st.integers(1, 5))
    values = data.draw(st.lists(st.sampled_from(SPECIAL), min_size=channels * length,
                                max_size=channels * length))
    x = torch.tensor(values, dtype=torch.float64).view(1, channels, length)
    if data.draw(st.booleans()):
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost
    x = x.to(dtype)
    grads = [torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0, -0.5]),
                                             min_size=channels, max_size=channels)),
                          dtype=dtype).view(1, channels) for _ in range(3)]
    xr = x.clone().requires_grad_(True)
    ours_out = sparsity_ext.channel_stats(xr)
    ours = torch.autograd.grad(tuple(ours_out), xr, grads)[0]
    x64 = x.double().requires_grad_(True)
    exact_out = reference.channel_stats(x64)
    exact = torch.autograd.grad(tuple(exact_out), x64, [g.double() for g in grads])[0]
    for a, b in zip(ours_out, exact_out):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.double(), b, rtol=ROUNDING[dtype] * 4 + 1e-6, atol=1e-6,
                                   equal_nan=True)
    assert torch.equal(ours.isnan(), exact.isnan()), (x, ours, exact)
    torch.testing.assert_close(ours.double(), exact, rtol=ROUNDING[dtype] * 8 + 1e-6,
                               atol=1e-5, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tensor_over_2_31_elements_does_not_wrap(layout):
    """A real bfloat16 tensor of 2^31 + 2^25 elements (4.3 GB): rows past element 2^31 must
    match the reference on that row alone, so a 32-bit offset anywhere would show."""
    n, c, h, w = 2, 1040, 1024, 1024
    pattern = torch.randn(1, 1, h, w)
    scale = torch.rand(n, c, 1, 1) * 4 + 0.1  # a different entropy for every row
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(n, c, h, w, dtype=torch.bfloat16, memory_format=memory_format)
    # bfloat16 operands: float32 ones would make an x-sized float32 temporary (8.6 GB).
    torch.mul(pattern.to(x.dtype).expand(n, c, h, w), scale.to(x.dtype).expand(n, c, h, w),
              out=x)
    assert x.numel() > 2**31
    out = sparsity_ext.channel_stats(x)
    for i, j in [(0, 0), (1, 0), (1, 17), (1, c - 1), (0, c - 1)]:
        exact = reference.channel_stats(x[i:i + 1, j:j + 1].double())
        for a, b in zip(out, exact):
            assert_close_to_float64(a[i:i + 1, j:j + 1], b, torch.bfloat16, rtol_acc=1e-4,
                                    atol=1e-5, what=f"row {(i, j)}")


def test_expanded_view_over_2_31_elements_is_read_in_place():
    """2^31 + 2^21 elements as a stride-0 view of one 4 MB row: no copy, every row equal."""
    base = torch.randn(1, 1, 2**20)
    x = base.expand(2, 1025, 2**20)
    assert x.numel() > 2**31
    out = sparsity_ext.entropy(x)
    assert torch.equal(out, out[0, 0].expand_as(out))
    torch.testing.assert_close(out[0, 0].double(), reference.entropy(base.double())[0, 0],
                               rtol=1e-5, atol=1e-6)


def test_concurrent_calls_from_python_threads():
    inputs = [torch.randn(4, 16, 20, 20) * (i + 1) for i in range(8)]
    expected = [reference.channel_stats(x.double()) for x in inputs]
    failures = []

    def work(i):
        for _ in range(5):
            x = inputs[i].clone().requires_grad_(True)
            ours = sparsity_ext.channel_stats(x)
            grad = torch.autograd.grad(ours.entropy.sum(), x)[0]
            try:
                torch.testing.assert_close(ours.entropy.double(), expected[i].entropy,
                                           rtol=1e-5, atol=1e-6)
                assert torch.isfinite(grad).all()
            except AssertionError as error:
                failures.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
