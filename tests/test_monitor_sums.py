"""monitor_sums_, the monitor's one native call per activation: every column against float64
formulas written from x alone, the plain-PyTorch fallback, the checks, compile."""

from __future__ import annotations

import math
import re

import pytest
import torch

from testing import (DEVICES, DTYPES, LAYOUTS, at_thread_counts, compiled, random_input,
                     sparsity_ext, with_layout)

ops = sparsity_ext.ops
COLUMNS = len(ops.MONITOR_COLUMNS)


def expected_sums(x: torch.Tensor) -> torch.Tensor:
    """The columns from their definitions, in float64, from x's (already rounded) values."""
    rows = x.detach().double().flatten(2)
    length = rows.shape[-1]
    p = rows.softmax(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    a = rows.clamp_min(0)
    s = a.sum(-1, keepdim=True)
    live = s.squeeze(-1) > 0
    q = a / torch.where(s > 0, s, 1)
    entropy_l1 = torch.where(live, -(q * q.clamp_min(1e-300).log()).sum(-1), 0)

    def sparsity_of(h):
        return (length - h.exp()) / (length - 1) if length > 1 else h * 0

    return torch.stack([
        sparsity_of(entropy).sum(), entropy.sum(),
        torch.where(live, sparsity_of(entropy_l1), 0).sum(), entropy_l1.sum(),
        live.sum().double(), (rows <= 0).sum().double(), rows.sum(),
        torch.tensor(float(rows.shape[0] * rows.shape[1])),
        torch.tensor(float(rows.numel())),
    ])  # fmt: skip


def tolerance(x: torch.Tensor) -> float:
    return 1e-10 if x.dtype == torch.float64 else 2e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 37, 7, 7), (3, 4, 8, 8), (2, 3, 17), (2, 5, 300), (1, 2, 9000),
                                   (4, 3, 1), (6, 40, 4, 4), (2, 24, 8, 8), (1, 35, 32)],
                         ids=str)  # fmt: skip
def test_every_column_matches_its_float64_definition(device, dtype, shape):
    x = random_input(shape, dtype, device)
    x[0, 0] = -1.0  # a dead row (no positive value)
    sums = torch.zeros(COLUMNS, dtype=torch.float64, device=device)
    ops.monitor_sums_(sums, x)
    ops.monitor_sums_(sums, x)  # adds: twice the sums
    want = 2 * expected_sums(x)
    assert_sums_close(sums.cpu(), want, x)


def assert_sums_close(got, want, x):
    """Relative to each column, but the sum of x relative to the sum of |x| (its rows are
    summed in float32, with cancellation)."""
    tol = tolerance(x)
    total = ops.MONITOR_COLUMNS.index("total")
    others = [i for i in range(COLUMNS) if i != total]
    torch.testing.assert_close(got[others], want[others], rtol=tol, atol=tol * 10)
    scale = 2 * x.detach().double().abs().sum().item()
    torch.testing.assert_close(got[total], want[total], rtol=0, atol=tol * scale)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_contiguous_sums(layout):
    x = with_layout(random_input((3, 20, 6, 7), torch.float32), layout)
    got = torch.zeros(COLUMNS, dtype=torch.float64)
    ops.monitor_sums_(got, x)
    want = torch.zeros(COLUMNS, dtype=torch.float64)
    ops.monitor_sums_(want, x.contiguous())
    # Per-row values in float32, by another kernel path for channels-last layouts.
    assert_sums_close(got, want, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_native_kernel_and_the_plain_pytorch_fallback_agree(dtype):
    assert compiled("cpu"), sparsity_ext._extension.load().describe()
    x = random_input((6, 33, 5, 5), dtype)
    x[1, 2] = 0.0
    native = torch.zeros(COLUMNS, dtype=torch.float64)
    ops.monitor_sums_(native, x)
    fallback = torch.zeros(COLUMNS, dtype=torch.float64)
    ops._monitor_sums_fallback(fallback, x)
    torch.testing.assert_close(native, fallback, rtol=tolerance(x), atol=tolerance(x))


def test_a_nan_row_makes_the_measures_nan_and_counts_as_live():
    x = random_input((2, 3, 4, 4), torch.float32)
    x[1, 1] = -1.0  # no positive value: live only because of its NaN
    x[1, 1, 2, 2] = math.nan
    sums = torch.zeros(COLUMNS, dtype=torch.float64)
    ops.monitor_sums_(sums, x)
    columns = dict(zip(ops.MONITOR_COLUMNS, sums.tolist()))
    for name in ("sparsity", "entropy", "sparsity_l1", "entropy_l1", "total"):
        assert math.isnan(columns[name]), name
    others = torch.cat([x[0].reshape(3, -1), x[1, [0, 2]].reshape(2, -1)])  # the other rows
    assert columns["live_rows"] == 1 + (others > 0).any(-1).sum().item()
    # NaN is not <= 0: the row's 15 other positions are
    assert columns["non_positive"] == 15 + (others <= 0).sum().item()
    assert columns["rows"] == 6 and columns["values"] == 96


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_sums_do_not_depend_on_the_thread_count(dtype):
    x = random_input((8, 70, 7, 7), dtype)  # 560 rows: several blocks of the parallel loop
    def sums():
        out = torch.zeros(COLUMNS, dtype=torch.float64)
        ops.monitor_sums_(out, x)
        return out

    results = at_thread_counts([1, 2, 3], sums)
    assert all(torch.equal(r, results[0]) for r in results)
    assert_sums_close(results[0], expected_sums(x), x)


def test_an_input_that_requires_grad_is_read_and_left_alone():
    x = random_input((2, 3, 4, 4), torch.float32).requires_grad_(True)
    before = x.detach().clone()
    sums = torch.zeros(COLUMNS, dtype=torch.float64)
    ops.monitor_sums_(sums, x)
    assert torch.equal(x.detach(), before) and x.grad is None
    assert_sums_close(sums, expected_sums(before), before)


@pytest.mark.parametrize(
    "sums, x, error, text",
    [
        (torch.zeros(COLUMNS, dtype=torch.float32), torch.randn(2, 3, 4), TypeError,
         "sums must have dtype torch.float64"),
        (torch.zeros(COLUMNS - 1, dtype=torch.float64), torch.randn(2, 3, 4), ValueError,
         "sums must have shape"),
        (torch.zeros(COLUMNS, dtype=torch.float64, device="meta"), torch.randn(2, 3, 4),
         RuntimeError, "all tensors must be on the same device"),
        (torch.zeros(COLUMNS, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 4),
         RuntimeError, "sums must not require grad"),
        (torch.zeros(COLUMNS, dtype=torch.float64), torch.randn(2, 3), ValueError,
         "x must have shape (N, C, *spatial)"),
        (torch.zeros(COLUMNS, dtype=torch.float64), torch.ones(2, 3, 4, dtype=torch.int64),
         TypeError, "x must be a floating-point tensor"),
    ],
    # "sums device" reaches the fake kernel even on the native path (meta dispatch): no
    # second real device here to reach the C++ check with.
    ids=["sums dtype", "sums shape", "sums device", "sums grad", "x dims", "x dtype"],
)
@pytest.mark.parametrize("path", ["native", "fallback", "fake"])
def test_bad_arguments_raise_the_same_error_on_every_path(sums, x, error, text, path):
    if path == "native":
        call = ops.monitor_sums_
    elif path == "fallback":
        call = ops._monitor_sums_fallback
    else:
        call = ops._monitor_sums_fake
    with pytest.raises(error, match=re.escape(text)):
        call(sums, x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_compiled_with_dynamic_shapes_it_adds_into_the_buffer_like_eager(requires_grad):
    sums = torch.zeros(COLUMNS, dtype=torch.float64)

    def step(x):
        ops.monitor_sums_(sums, x)
        return x.relu().sum()

    compiled_step = torch.compile(step, dynamic=True, fullgraph=True)
    want = torch.zeros(COLUMNS, dtype=torch.float64)
    for size in (5, 6, 7):
        x = random_input((2, 3, size, size), torch.float32).requires_grad_(requires_grad)
        loss = compiled_step(x)
        if requires_grad:  # the graph around the op still differentiates
            (grad,) = torch.autograd.grad(loss, x)
            torch.testing.assert_close(grad, (x > 0).float())
        ops.monitor_sums_(want, x)
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-9)


def test_the_column_order_is_the_one_the_cpp_header_declares():
    from pathlib import Path

    header = (Path(sparsity_ext.__file__).parent.parent / "csrc" / "monitor_sums_params.h")
    if not header.exists():  # an installed package ships csrc inside it
        header = Path(sparsity_ext.__file__).parent / "csrc" / "monitor_sums_params.h"
    text = header.read_text()
    positions = [text.index(f"kMonitor{''.join(p.title() for p in n.split('_'))} = {i},")
                 for i, n in enumerate(ops.MONITOR_COLUMNS)]
    assert positions == sorted(positions)
