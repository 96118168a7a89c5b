"""The fused operator against the float64 reference: values, gradients, layouts, dtypes,
non-finite semantics, bad input, torch.compile, opcheck, determinism and memory."""

import contextlib
import itertools
import math

import pytest
import torch

from testing import (DEVICES, DTYPES, LAYOUTS, ROUNDING, assert_close_to_float64, at_thread_counts,
                     compiled, low_precision_reference, random_input, reference, sparsity_ext,
                     with_layout)

SHAPES = [
    (2, 3, 7, 7),        # the short rows of late conv layers
    (5, 37, 7, 7),       # many short rows: full and partial groups of 16 (AVX2: 8) across samples
    (3, 19, 5, 7),       # L = 35: two full 16 x 16 tiles and a masked one of 3 positions
                         # (AVX2: four 8 x 8 tiles and 3 positions read one at a time)
    (2, 17, 8, 8),       # L = 64: full tiles only, the longest short row
    (3, 7, 2, 9),        # L = 18: a tile and a tail of 2 read a position at a time
    (3, 5, 9),           # L = 9: AVX2's backward by rows, at most one vector inside a row
    (3, 5, 1),           # L = 1
    (1, 1, 2),
    (2, 3, 17),          # 1-D, odd length
    (4, 33, 13, 11),     # odd channel count: channels-last vector tails
    (2, 3, 5, 4, 3),     # 3-D
    (2, 2, 8193),        # one past a chunk of the row kernel
    (1, 2, 100_003),     # long rows
]
OUTPUTS = ("entropy", "perplexity", "sparsity")


def test_the_fused_kernel_is_what_gets_tested():
    """Without this every agreement test below could pass against the reference itself."""
    assert compiled("cpu"), sparsity_ext._extension.load().describe()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_float64_reference(device, dtype, shape, layout):
    x = with_layout(random_input(shape, dtype, device), layout)
    ours = sparsity_ext.channel_stats(x)
    exact = reference.channel_stats(x.double())
    for name, a, b in zip(OUTPUTS, ours, exact):
        assert a.shape == shape[:2] and a.dtype == dtype and a.device == x.device
        # Long rows accumulate over 10^5 terms in float32: allow for that.
        assert_close_to_float64(a, b, dtype, rtol_acc=1e-5 if dtype != torch.float64 else 1e-12,
                                atol=1e-6 if dtype != torch.float64 else 1e-12,
                                what=f"{name} {dtype} {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (2, 8, 56, 56), (2, 3, 5000)], ids=str)
def test_half_precision_no_worse_than_plain_pytorch_in_that_dtype(device, dtype, shape):
    """flash-attention's yard stick: at most 2x the error of a same-dtype PyTorch computation."""
    x = random_input(shape, dtype, device)
    exact = reference.channel_stats(x.double())
    ours = sparsity_ext.channel_stats(x)
    plain = low_precision_reference(x)
    for name, a, p, e in zip(OUTPUTS, ours, plain, exact):
        ours_error = (a.double() - e).abs().max().item()
        plain_error = (p.double() - e).abs().max().item()
        assert ours_error <= 2 * plain_error + 1e-6, (name, ours_error, plain_error)


def _grads_against_reference(x, dtype):
    grads_out = [torch.randn(x.shape[:2], dtype=torch.float64, device=x.device).to(dtype)
                 for _ in OUTPUTS]
    xr = x.detach().requires_grad_(True)
    ours = torch.autograd.grad(sparsity_ext.channel_stats(xr), xr, grads_out)[0]
    x64 = x.detach().double().requires_grad_(True)
    exact = torch.autograd.grad(reference.channel_stats(x64), x64,
                                [g.double() for g in grads_out])[0]
    return ours, exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:-1], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_float64_autograd(device, dtype, shape, layout):
    x = with_layout(random_input(shape, dtype, device), layout)
    ours, exact = _grads_against_reference(x, dtype)
    assert ours.shape == x.shape and ours.dtype == dtype
    scale = exact.abs().max().item()
    # Each element is rounded once to dtype; the row coefficient carries the outputs' error.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_to_float64(ours, exact, dtype, rtol_acc=tol, atol=tol * scale + 1e-30,
                            what=f"grad {dtype} {layout}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for shape, layout in [((2, 3, 4, 5), "contiguous"), ((2, 3, 4, 5), "channels_last"),
                          ((2, 2, 7), "sliced"), ((3, 2, 1), "contiguous")]:
        x = with_layout(random_input(shape, torch.float64, device), layout).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: tuple(sparsity_ext.channel_stats(t)), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_single_outputs_and_their_gradients(device):
    x = random_input((3, 4, 6, 5), torch.float32, device).requires_grad_(True)
    for name in OUTPUTS:
        ours = getattr(sparsity_ext, name)(x)
        exact = getattr(reference, name)(x.detach().double())
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
        g = torch.autograd.grad(ours.sum(), x)[0]  # expanded (stride 0) grad_output
        x64 = x.detach().double().requires_grad_(True)
        g64 = torch.autograd.grad(getattr(reference, name)(x64).sum(), x64)[0]
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


def test_channels_last_is_read_in_place():
    x = random_input((2, 16, 5, 6), torch.float32).contiguous(memory_format=torch.channels_last)
    g = torch.autograd.grad(sparsity_ext.entropy(x.requires_grad_(True)).sum(), x)[0]
    assert g.is_contiguous(memory_format=torch.channels_last)


# --- non-finite semantics (sparsity_ext/reference.py) ---------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_minus_inf_positions_are_masked(device, dtype, layout):
    n, c, h, w = 3, 20, 9, 7
    x = random_input((n, c, h, w), dtype, device)
    mask = torch.rand(n, c, h, w, device=device) < 0.4
    mask[..., 0, 0] = False  # every row keeps at least one finite position
    mask[0, 0] = True
    mask[0, 0, 3, 3] = False  # a row with one finite position: a one-hot softmax
    x = with_layout(x.masked_fill(mask, float("-inf")), layout).requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    for row in [(0, 0), (1, 5), (2, 19)]:
        finite = x.detach()[row][~mask[row]].double()
        p = torch.softmax(finite, 0)
        expected_entropy = -(p * p.log()).sum()
        torch.testing.assert_close(stats.entropy[row].double(), expected_entropy,
                                   rtol=ROUNDING[dtype] * 4, atol=1e-6)
    assert stats.entropy[0, 0].item() == 0.0 and stats.sparsity[0, 0].item() == 1.0
    g = torch.autograd.grad(sum(o.sum() for o in stats), x)[0]
    assert torch.isfinite(g).all()
    assert (g[mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_or_plus_inf_poisons_its_row_only(device, dtype, bad, layout):
    x = random_input((2, 18, 6, 5), dtype, device)
    x[1, 7, 2, 3] = bad
    x = with_layout(x, layout).requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    poisoned = torch.zeros(2, 18, dtype=torch.bool, device=device)
    poisoned[1, 7] = True
    for out in stats:
        assert out[poisoned].isnan().all()
        assert torch.isfinite(out[~poisoned]).all()
    exact = reference.channel_stats(x.detach().double())
    torch.testing.assert_close(stats.entropy[~poisoned].double(), exact.entropy[~poisoned],
                               rtol=ROUNDING[dtype] * 2 + 1e-5, atol=1e-6)
    g = torch.autograd.grad(stats.entropy.sum(), x)[0]
    assert g[1, 7].isnan().all()
    assert torch.isfinite(g[0]).all() and torch.isfinite(g[1, :7]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", ["all -inf", "+inf and -inf", "nan and -inf"])
def test_poisoned_row_is_nan_in_value_and_in_every_gradient_position(device, dtype, row):
    x = random_input((2, 3, 4, 4), dtype, device)
    x[0, 1] = float("-inf")
    if row != "all -inf":
        x[0, 1, 2, 2] = float("inf") if row.startswith("+inf") else float("nan")
        x[0, 1, 3, 0] = 0.5
    x.requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    for out in stats:
        assert out[0, 1].isnan() and torch.isfinite(out[0, 0]) and torch.isfinite(out[1]).all()
    # only the entropy of another row is differentiated: the poisoned row still gets NaN
    g = torch.autograd.grad(stats.entropy[1].sum() + 0 * stats.entropy[0, 1], x)[0]
    assert g[0, 1].isnan().all()
    assert torch.isfinite(g[0, 0]).all() and torch.isfinite(g[1]).all()
    x64 = x.detach().double().requires_grad_(True)
    e = reference.channel_stats(x64).entropy
    g64 = torch.autograd.grad(e[1].sum() + 0 * e[0, 1], x64)[0]
    assert torch.equal(g.isnan(), g64.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_position_rows(device, dtype):
    x = random_input((4, 6, 1, 1), dtype, device).requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    assert (stats.entropy == 0).all() and (stats.perplexity == 1).all()
    assert (stats.sparsity == 0).all()
    g = torch.autograd.grad(sum(o.sum() for o in stats), x)[0]
    assert (g == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_far_from_zero_rows_keep_their_precision(device):
    """Sums relative to the row maximum: x = 1e4 + noise is as accurate as the noise alone."""
    noise = random_input((2, 4, 50), torch.float32, device, scale=1.0)
    far = sparsity_ext.channel_stats(noise + 1e4)
    near = reference.channel_stats((noise + 1e4).double() - 1e4)
    torch.testing.assert_close(far.entropy.double(), near.entropy, rtol=1e-3, atol=1e-3)


# |max| log2(e) = 2^20: beyond it the AVX-512 and AVX2 CPU backward leaves the frame of
# y = x log2(e) - offset for the shift frame x - max (FramedGradTerms in csrc/cpu).
FRAME_LIMIT = 2.0**20 / math.log2(math.e)  # about 726817


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 32, 49), (2, 24, 7, 7), (2, 32, 300), (2, 520, 70),
                                   (3, 16, 20000)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_rows_of_any_magnitude_match_the_reference(device, dtype, shape, layout):
    """Rows far from zero on both sides of FRAME_LIMIT, some with masked positions: forward
    and backward match float64 on the same input. The backward decides per group of 16 rows
    (AVX2: 8) or per block of 8 to 32 channels, so rows come in runs of 32 of three kinds:
    within the limit, beyond it (moderately: the offset's rounding error stays below 1), and
    a mix that adds enormous ones."""
    rows = shape[0] * shape[1]
    within = torch.tensor([0.0, 1e2, -3e3, 1e4, 0.99 * FRAME_LIMIT, -0.99 * FRAME_LIMIT],
                          dtype=torch.float64)
    beyond = torch.tensor([1.01 * FRAME_LIMIT, -1.01 * FRAME_LIMIT, 3e6, -8e6],
                          dtype=torch.float64)
    enormous = torch.tensor([-1e9, 3e12, -3e30], dtype=torch.float64)
    kinds = [within, beyond, torch.cat([within, beyond, enormous])]
    offsets = torch.stack([kinds[(r // 32) % 3][torch.randint(len(kinds[(r // 32) % 3]), ())]
                           for r in range(rows)])
    x = random_input(shape, torch.float64, device) + offsets.to(device).reshape(
        shape[:2] + (1,) * (len(shape) - 2))
    x.flatten(2)[:, ::3, ::5] = -math.inf  # masked positions in every third row
    x = with_layout(x.to(dtype), layout)
    ours = sparsity_ext.channel_stats(x)
    exact = reference.channel_stats(x.double())
    for name, a, b in zip(OUTPUTS, ours, exact):
        assert_close_to_float64(a, b, dtype, rtol_acc=1e-5, atol=1e-6, what=f"{name} {layout}")
    ours_grad, exact_grad = _grads_against_reference(x, dtype)
    assert_close_to_float64(ours_grad, exact_grad, dtype, rtol_acc=1e-5,
                            atol=1e-5 * exact_grad.abs().max().item(), what=f"grad {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 32, 49), (4, 24, 7, 7), (3, 32, 300), (2, 520, 70)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_output_gradients_of_any_magnitude_match_the_reference(device, dtype, shape, layout):
    """Output gradients from 1e-20 to 1e37, per row: beyond about 1e30 the CPU backward
    leaves the frame of FramedGradTerms (on AVX-512 its product scale (y - center) must stay
    finite where 2^y is tiny). Rows come in runs of 32 of three kinds (within, beyond,
    mixed), with masked positions and one position per row 86 below the row's maximum
    (2^y near 2^-124); each row's gradient is finite and matches float64 to 1e-3 of the
    row's largest (the float32 error on rows this spread reaches a few 1e-5 of it at any
    magnitude)."""
    rows = shape[0] * shape[1]
    within = torch.tensor([1.0, 1e-20, 1e20, 1e29], dtype=torch.float64)
    beyond = torch.tensor([1e32, 1e35, 1e37], dtype=torch.float64)
    kinds = [within, beyond, torch.cat([within, beyond])]
    magnitude = torch.stack([kinds[(r // 32) % 3][torch.randint(len(kinds[(r // 32) % 3]), ())]
                             for r in range(rows)]).reshape(shape[:2]).to(device)
    x = random_input(shape, torch.float64, device, scale=12.0)
    x.flatten(2)[:, :, 1] = x.flatten(2).amax(-1) - 86.0
    x.flatten(2)[:, ::3, ::5] = -math.inf
    x = with_layout(x.to(dtype), layout).requires_grad_(True)
    # Outputs' gradients of the row's magnitude, below it by at most 4 (so the row's
    # coefficient keeps it: no cancellation to a far smaller one).
    grads_out = [(magnitude * torch.empty_like(magnitude).uniform_(0.25, 1.0)).to(dtype)
                 for _ in OUTPUTS]
    ours = torch.autograd.grad(sparsity_ext.channel_stats(x), x, grads_out)[0]
    x64 = x.detach().double().requires_grad_(True)
    exact = torch.autograd.grad(reference.channel_stats(x64), x64,
                                [g.double() for g in grads_out])[0]
    row_largest = exact.flatten(2).abs().amax(-1).reshape(shape[:2] + (1,) * (len(shape) - 2))
    assert ours.isfinite().all() and exact.isfinite().all()
    assert_close_to_float64(ours, exact, dtype, rtol_acc=1e-5, atol=1e-3 * row_largest,
                            what=f"grad {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 40, 7, 7), (2, 40, 300)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_a_rows_gradient_does_not_depend_on_the_other_rows(dtype, shape, layout):
    """Rows that leave the backward's frame (NaN, far beyond FRAME_LIMIT) change nothing in
    the other rows of their group: same bits as without them."""
    base = random_input(shape, torch.float64)
    changed = base.clone()
    changed[0, 3] = math.nan
    changed[1, ::7] += 1e7
    x, x_changed = (with_layout(t.to(dtype), layout).requires_grad_(True) for t in (base, changed))
    grads = [torch.randn(shape[:2], dtype=torch.float64).to(dtype) for _ in OUTPUTS]
    ours = torch.autograd.grad(sparsity_ext.channel_stats(x), x, grads)[0]
    ours_changed = torch.autograd.grad(sparsity_ext.channel_stats(x_changed), x_changed, grads)[0]
    same = torch.ones(shape[:2], dtype=torch.bool)
    same[0, 3] = False
    same[1, ::7] = False
    assert torch.equal(ours[same], ours_changed[same])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (0, 0, 5)], ids=str)
def test_empty_batch_or_channels_give_empty_results(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    stats = sparsity_ext.channel_stats(x)
    assert all(o.shape == shape[:2] for o in stats)
    g = torch.autograd.grad(stats.sparsity.sum(), x)[0]
    assert g.shape == x.shape and g.device == x.device and (g == 0).all()


# --- bad input: the public functions and the native ops raise the same -------------------


def _raises_the_same(x, error_type, message):
    """The public function and the native op (eager, fake/meta and fallback alike) raise
    `error_type` with exactly `message`."""
    with pytest.raises(error_type) as public:
        sparsity_ext.channel_stats(x)
    with pytest.raises(error_type) as native:
        torch.ops.sparsity_ext.channel_stats_forward(x)
    assert str(public.value) == message
    assert str(native.value) == message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_floating_dtypes_are_rejected(dtype):
    _raises_the_same(torch.ones(2, 3, 4, 4).to(dtype), TypeError,
                     "sparsity_ext: x must be a floating-point tensor (float16, bfloat16, "
                     f"float32 or float64), got {dtype}")


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)], ids=str)
def test_fewer_than_three_dims_are_rejected(shape):
    _raises_the_same(torch.randn(shape), ValueError,
                     "sparsity_ext: x must have shape (N, C, *spatial) with at least one "
                     f"spatial dim, got shape {list(shape)}")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_zero_spatial_positions_are_rejected(device):
    _raises_the_same(torch.randn(2, 3, 4, 0, device=device), ValueError,
                     "sparsity_ext: x must have at least one spatial position, got shape "
                     "[2, 3, 4, 0]")


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested", "jagged"])
def test_sparse_nested_and_jagged_tensors_are_a_type_error(kind):
    if kind == "nested":
        x = torch.nested.nested_tensor([torch.randn(3, 4, 4), torch.randn(3, 5, 4)])
    elif kind == "jagged":
        x = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)],
                                       layout=torch.jagged)
    elif kind == "sparse_csr":
        x = torch.randn(2, 3, 4, 4).to_sparse_csr(dense_dim=2)
    else:
        x = torch.randn(2, 3, 4, 4).to_sparse()
    _raises_the_same(x, TypeError, "sparsity_ext: x must be a dense (strided) tensor; sparse, "
                     "nested and other layouts are not supported")


def test_not_a_tensor_is_rejected():
    with pytest.raises(TypeError, match="^sparsity_ext: expected a torch.Tensor, got list$"):
        sparsity_ext.channel_stats([[[1.0]]])


def _backward_raises_the_same(args, error_type, message, grad_x=None):
    """The native backward op (and its .out variant, and their fake kernels on meta
    tensors) raise `error_type` with exactly `message`."""
    calls = [lambda: torch.ops.sparsity_ext.channel_stats_backward(*args)]
    if grad_x is not None:
        calls.append(lambda: torch.ops.sparsity_ext.channel_stats_backward.out(
            *args, grad_x=grad_x))
    for call in calls:
        with pytest.raises(error_type) as error:
            call()
        assert str(error.value) == message


def test_backward_op_checks_every_argument():
    x = torch.randn(2, 3, 4, 4)
    stats = torch.ops.sparsity_ext.channel_stats_forward(x)[3]
    g = torch.randn(2, 3)
    out = torch.empty_like(x)
    cases = [
        ((x, stats, torch.randn(3, 2), g, g), ValueError,
         "sparsity_ext: grad_entropy must have shape [2, 3], got [3, 2]"),
        ((x, stats, g, torch.empty(0), g), ValueError,  # a missing grad as 0 elements
         "sparsity_ext: grad_perplexity must have shape [2, 3], got [0]"),
        ((x, stats[:2], g, g, g), ValueError,
         "sparsity_ext: row_stats must have shape [3, 2, 3], got [2, 2, 3]"),
        ((x, stats.double(), g, g, g), TypeError,
         "sparsity_ext: row_stats must have dtype torch.float32, got torch.float64"),
        ((x, stats, g, g, g.double()), TypeError,
         "sparsity_ext: grad_sparsity must have dtype torch.float32, got torch.float64"),
        ((x, stats, g.to("meta"), g, g), RuntimeError,  # used to return uninitialised memory
         "sparsity_ext: all tensors must be on the same device, but x is on cpu and "
         "grad_entropy is on meta"),
        ((x.to("meta"), stats, g, g, g), RuntimeError,
         "sparsity_ext: all tensors must be on the same device, but x is on meta and "
         "row_stats is on cpu"),
        ((x, stats, g.to_sparse(), g, g), TypeError,
         "sparsity_ext: grad_entropy must be a dense (strided) tensor; sparse, nested and "
         "other layouts are not supported"),
        ((x.int(), stats, g, g, g), TypeError,
         "sparsity_ext: x must be a floating-point tensor (float16, bfloat16, float32 or "
         "float64), got torch.int32"),
    ]
    for args, error_type, message in cases:
        _backward_raises_the_same(args, error_type, message, grad_x=out)


def test_backward_out_checks_grad_x():
    x = torch.randn(2, 3, 4, 4)
    stats = torch.ops.sparsity_ext.channel_stats_forward(x)[3]
    g = torch.randn(2, 3)
    out = torch.ops.sparsity_ext.channel_stats_backward.out
    for grad_x, error_type, message in [
            (torch.empty(2, 3, 4), ValueError,
             "sparsity_ext: grad_x must have shape [2, 3, 4, 4], got [2, 3, 4]"),
            (torch.empty(2, 3, 4, 4, dtype=torch.float64), TypeError,
             "sparsity_ext: grad_x must have dtype torch.float32, got torch.float64"),
            (torch.empty(2, 3, 4, 4, device="meta"), RuntimeError,
             "sparsity_ext: all tensors must be on the same device, but x is on cpu and "
             "grad_x is on meta")]:
        with pytest.raises(error_type) as error:
            out(x, stats, g, g, g, grad_x=grad_x)
        assert str(error.value) == message
    # The kernels write grad_x densely, positions or channels innermost; nothing else.
    strided = torch.empty(2, 3, 4, 8)[..., ::2]
    with pytest.raises(ValueError) as error:
        out(x, stats, g, g, g, grad_x=strided)
    assert str(error.value) == ("sparsity_ext: grad_x must be dense with its positions or its "
                                "channels unit-stride, got strides [96, 32, 8, 2]")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_backward_out_reads_x_in_grad_x_layout(layout, grad_layout):
    """x in any layout, grad_x in either dense layout: the same bits as the functional op."""
    values = random_input((2, 6, 5, 4), torch.float32)
    values[1, 2] += 2e6  # one row beyond FRAME_LIMIT: its group mixes the two frames
    x = with_layout(values, layout)
    stats = torch.ops.sparsity_ext.channel_stats_forward(x)[3]
    grads = [torch.randn(2, 6) for _ in range(3)]
    expected = torch.ops.sparsity_ext.channel_stats_backward(x, stats, *grads)
    grad_x = with_layout(torch.full((2, 6, 5, 4), float("nan")), grad_layout)
    torch.ops.sparsity_ext.channel_stats_backward.out(x, stats, *grads, grad_x=grad_x)
    assert torch.equal(grad_x, expected)


@pytest.mark.parametrize("device", [d for d in DEVICES if compiled(d)] or
                         [pytest.param("cpu", marks=pytest.mark.skip(
                             reason="no compiled kernel: both rules would be Python's"))])
@pytest.mark.parametrize("op", ["channel_stats_backward", "l1_stats_backward"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (2, 6, 1, 4), (2, 1, 5, 4), (2, 6, 7),
                                   (2, 3, 2, 3, 4), (0, 6, 5, 4)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_functional_backward_allocates_grad_x_by_the_fake_kernels_rule(device, op, shape,
                                                                       layout):
    """The CPU library allocates grad_x in C++ (empty_grad_x), the fake and fallback kernels
    in Python (_grad_x_like): the same strides for every layout, size-1 dims included."""
    x = with_layout(random_input(shape, torch.float32, device), layout)
    measure = sparsity_ext.ops.CHANNEL_STATS if op.startswith("channel") else \
        sparsity_ext.ops.L1_STATS
    stats = measure.forward_op(x)[3]
    grads = [torch.randn(shape[:2], device=device) for _ in range(3)]
    grad_x = getattr(torch.ops.sparsity_ext, op)(x, stats, *grads)
    assert grad_x.stride() == sparsity_ext.ops._grad_x_like(x).stride()


# --- torch.library / torch.compile ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_opcheck(device, dtype, layout):
    x = with_layout(random_input((2, 5, 4, 3), dtype, device), layout)
    torch.library.opcheck(torch.ops.sparsity_ext.channel_stats_forward.default, (x,))
    _, _, _, stats = torch.ops.sparsity_ext.channel_stats_forward(x)
    grads = [torch.randn(2, 5, device=device, dtype=dtype) for _ in range(3)]
    grads[1] = torch.randn(1, 1, device=device, dtype=dtype).expand(2, 5)
    torch.library.opcheck(torch.ops.sparsity_ext.channel_stats_backward.default,
                          (x, stats, *grads))
    torch.library.opcheck(torch.ops.sparsity_ext.channel_stats_backward.out,
                          (x, stats, *grads), {"grad_x": torch.empty_like(x)})


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()

    def loss_fn(x, w):
        y = torch.nn.functional.conv2d(x, w, padding=1).relu()
        stats = sparsity_ext.channel_stats(y)
        return stats.sparsity.mean() + 0.1 * stats.entropy.mean()

    compiled_loss = torch.compile(loss_fn, fullgraph=True)
    x = torch.randn(4, 3, 12, 12, device=device)
    w = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    eager_value = loss_fn(x, w)
    eager_grad = torch.autograd.grad(eager_value, w)[0]
    value = compiled_loss(x, w)
    grad = torch.autograd.grad(value, w)[0]
    torch.testing.assert_close(value, eager_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_compiled_graph_calls_the_fused_ops():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))  # with nested subgraphs
        return gm.forward

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    torch.compile(lambda t: sparsity_ext.sparsity(t).sum(), backend=backend, fullgraph=True)(x)
    assert any("sparsity_ext" in g for g in graphs), graphs


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no requires_grad"])
def test_without_autograd_the_forward_op_is_called_directly(mode):
    """Nothing to differentiate: the same bits as through the autograd.Function, eager and
    compiled, and the graph still holds the fused op."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    x = random_input((3, 5, 9, 9), torch.float32)
    with_grad = [t.detach() for t in sparsity_ext.channel_stats(x.clone().requires_grad_(True))]
    compiled = torch.compile(sparsity_ext.channel_stats, backend=backend, fullgraph=True)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, contextlib.nullcontext)
    with context():
        source = x.clone().requires_grad_(mode != "no requires_grad")
        for stats in (sparsity_ext.channel_stats(source), compiled(source)):
            assert not any(t.requires_grad for t in stats)
            for ours, reference in zip(stats, with_grad):
                assert torch.equal(ours, reference)
    assert any("sparsity_ext.channel_stats_forward" in g for g in graphs), graphs


# --- determinism and memory -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_bits_every_call_and_every_thread_count(layout):
    x = with_layout(random_input((6, 24, 30, 30), torch.float32), layout).requires_grad_(True)
    g_out = torch.randn(6, 24)

    def entropy_and_grad():
        e = sparsity_ext.entropy(x)
        return e.detach(), torch.autograd.grad(e, x, g_out)[0]

    threads = torch.get_num_threads()
    results = at_thread_counts([1, threads, 1, max(2, threads)], entropy_and_grad)
    for e, g in results[1:]:
        assert torch.equal(e, results[0][0]) and torch.equal(g, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_rows_same_bits_wherever_a_row_falls_among_groups_batches_and_chunks(dtype):
    """The kernels take rows in groups of 16 (AVX2: 8), finish (forward) and take coefficients for
    (backward) four groups at a time, and hand chunks of groups to threads as they ask. A
    row's bits must depend on none of it. 2085 7x7 rows (130 groups of 16 and a partial
    one) on 1, 2 and 3 threads; and without the first sample, which moves every row 417
    rows earlier: into another lane, group, batch and chunk."""
    x = random_input((5, 417, 7, 7), dtype).requires_grad_(True)  # 2085 rows
    weights = [torch.randn(5, 417, dtype=dtype) for _ in range(3)]

    def stats_and_grad(x, weights):
        stats = sparsity_ext.channel_stats(x)
        return [t.detach() for t in stats] + list(torch.autograd.grad(tuple(stats), x, weights))

    runs = at_thread_counts([1, 2, 3], lambda: (
        stats_and_grad(x, weights), stats_and_grad(x[1:], [w[1:] for w in weights])))
    for result, moved in runs:
        assert all(torch.equal(a[1:], b) for a, b in zip(result, moved))
    results = [result for result, _ in runs]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    xd = x.detach().double().requires_grad_(True)
    exact = reference.channel_stats(xd)
    exact_grad, = torch.autograd.grad(tuple(exact), xd, [w.double() for w in weights])
    for name, ours, want in zip(OUTPUTS, results[0], exact):
        assert_close_to_float64(ours, want.detach(), dtype, what=name)
    assert_close_to_float64(results[0][3], exact_grad, dtype, rtol_acc=1e-5,
                            atol=1e-5 * exact_grad.abs().max().item(), what="grad")


def _allocations(fn):
    """Bytes allocated by each op that allocated while fn runs (torch.profiler's memory
    records attribute every allocation to the innermost op, e.g. aten::empty)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        out = fn()
    return out, [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "expanded",
                                    "channels_last_batch_sliced"])
def test_forward_allocates_nothing_of_the_size_of_x_and_backward_only_grad_x(layout):
    x = with_layout(random_input((8, 32, 24, 24), torch.float32), layout).requires_grad_(True)
    out, forward_allocs = _allocations(lambda: sparsity_ext.channel_stats(x))
    assert forward_allocs, "the profiler recorded no allocation at all"
    assert max(forward_allocs) < x.nbytes // 8, forward_allocs
    loss = out.entropy.sum() + out.sparsity.sum()
    grad, backward_allocs = _allocations(lambda: torch.autograd.grad(loss, x)[0])
    big = [s for s in backward_allocs if s >= x.nbytes // 8]
    assert big == [x.nbytes], backward_allocs
    assert grad.nbytes == x.nbytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_among_only_masked_positions_of_a_long_row(dtype, layout):
    """A chunk of a long row holding only -inf and NaN must still poison the row, value and
    gradient: the kernels' running max skips NaN. Chunks are 8192 positions of a row laid
    out contiguous and 512 channels_last; row 0 has such a chunk in its middle, row 1 first."""
    x = random_input((1, 3, 200, 200), dtype)
    rows = x.view(1, 3, -1)
    rows[0, 0, 20_000:30_000] = float("-inf")
    rows[0, 0, 25_000] = float("nan")
    rows[0, 1, :600] = float("-inf")
    rows[0, 1, 10] = float("nan")
    x = with_layout(x, layout).requires_grad_(True)
    stats = sparsity_ext.channel_stats(x)
    for out in stats:
        assert out[0, :2].isnan().all() and torch.isfinite(out[0, 2])
    g = torch.autograd.grad(stats.entropy.sum(), x)[0]
    assert g[0, :2].isnan().all() and torch.isfinite(g[0, 2]).all()


def test_chunks_far_apart_merge_without_overflow():
    """Two 8192-position chunks of one row 1e35 apart: the lower one must scale to 0,
    not to -inf * 0 = NaN."""
    x = torch.zeros(1, 1, 16384)
    x[..., 8192:] = 1e35
    torch.testing.assert_close(sparsity_ext.entropy(x).double(),
                               reference.entropy(x.double()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_strided_short_rows_same_bits_for_every_thread_count_and_equal_rows(layout):
    base = torch.randn(1, 7, 7, 7)
    x = base.expand(301, 7, 7, 7) if layout == "expanded" else \
        torch.randn(7, 301, 7, 7).transpose(0, 1)
    threads = torch.get_num_threads()
    results = at_thread_counts([1, max(2, threads), 3], lambda: sparsity_ext.entropy(x))
    for r in results[1:]:
        assert torch.equal(r, results[0])
    if layout == "expanded":  # every sample holds the same data: the same bits
        assert torch.equal(results[0], results[0][:1].expand_as(results[0]))


def test_float8_is_rejected_with_a_clear_message():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    with pytest.raises(TypeError, match="floating-point"):
        sparsity_ext.entropy(torch.randn(2, 3, 4, 4).to(torch.float8_e4m3fn))


# --- registration, dynamic shapes, export, TorchScript --------------------------------

_FRESH_PROCESS = """
import torch
import sparsity_ext
x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
x.requires_grad_(True)
native = torch.ops.sparsity_ext.channel_stats_forward(x)   # right after import
public = sparsity_ext.channel_stats(x)
assert all(torch.equal(a, b) for a, b in zip(native[:3], public))
g = torch.autograd.grad(native[2].sum(), x)[0]
x64 = x.detach().requires_grad_(True)
exact = torch.autograd.grad(sparsity_ext.reference.sparsity(x64).sum(), x64)[0]
torch.testing.assert_close(g, exact, rtol=1e-9, atol=1e-12)
print(sparsity_ext._extension.load().describe())
"""


@pytest.mark.parametrize("extension", ["loaded", "disabled"])
def test_ops_exist_and_differentiate_right_after_import_in_a_fresh_process(extension):
    """Also with the extension disabled: then the reference kernels serve the same ops."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if extension == "disabled":
        env["SPARSITY_EXT_NO_EXTENSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    loaded = "compiled operator loaded" in result.stdout
    assert loaded == (extension == "loaded"), result.stdout


def test_compile_dynamic_one_graph_for_ten_spatial_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def loss_fn(x):
        stats = sparsity_ext.channel_stats(x)
        return stats.sparsity.sum() + stats.entropy.sum()

    compiled_loss = torch.compile(loss_fn, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for h in range(4, 14):  # sizes distinct from N and C, so no duck-sized equality
        x = torch.randn(2, 3, h, h + 3, generator=g, requires_grad=True)
        value = compiled_loss(x)
        (grad,) = torch.autograd.grad(value, x)
        x64 = x.detach().double().requires_grad_(True)
        exact = loss_fn_reference(x64)
        torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), torch.autograd.grad(exact, x64)[0],
                                   rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1, counter.frame_count
    graph = counter.graphs[0].print_readable(print_output=False)
    assert "sparsity_ext.channel_stats_forward" in graph


def loss_fn_reference(x):
    stats = reference.channel_stats(x)
    return stats.sparsity.sum() + stats.entropy.sum()


def test_export_with_dynamic_batch_channels_and_spatial_dims():
    from torch.export import Dim

    class Sparsity(torch.nn.Module):
        def forward(self, x):
            return sparsity_ext.channel_stats(x).sparsity

    g = torch.Generator().manual_seed(0)
    dims = {0: Dim("n", min=1), 1: Dim("c", min=1), 2: Dim("h", min=2), 3: Dim("w", min=2)}
    program = torch.export.export(Sparsity(), (torch.randn(2, 3, 5, 6, generator=g),),
                                  dynamic_shapes={"x": dims})
    assert "sparsity_ext.channel_stats_forward" in str(program.graph)
    for shape in [(4, 7, 9, 3), (1, 2, 2, 11)]:
        x = torch.randn(shape, generator=g)
        torch.testing.assert_close(program.module()(x).double(),
                                   reference.sparsity(x.double()), rtol=1e-5, atol=1e-6)


def test_torchscript_trace_and_script():
    """What the README says: trace records the native op; script runs the public functions
    through Python (so a scripted module cannot be saved unless it calls torch.ops)."""
    import io

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, requires_grad=True)
    traced = torch.jit.trace(sparsity_ext.entropy, (x,))
    assert "sparsity_ext::channel_stats_forward" in str(traced.graph)
    y = torch.randn(3, 2, 6, 7, generator=g, requires_grad=True)
    assert torch.equal(traced(y), sparsity_ext.entropy(y))

    class Model(torch.nn.Module):
        def forward(self, x):
            return sparsity_ext.sparsity(x) + torch.ops.sparsity_ext.channel_stats_forward(x)[0]

    scripted = torch.jit.script(Model())
    assert torch.equal(scripted(y), Model()(y))
    (grad,) = torch.autograd.grad(scripted(y).sum(), y)
    assert torch.equal(grad, torch.autograd.grad(Model()(y).sum(), y)[0])
    with pytest.raises(RuntimeError,
                       match="Could not export Python function call '_channel_stats'"):
        torch.jit.save(scripted, io.BytesIO())

    @torch.jit.script
    def saved_entropy(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsity_ext.channel_stats_forward(x)[0]

    buffer = io.BytesIO()
    torch.jit.save(saved_entropy, buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(y), sparsity_ext.entropy(y))
