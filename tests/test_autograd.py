"""Every autograd path of the operator against autograd of the float64 reference: reverse
mode to second order, forward mode, every torch.func transform, direct torch.ops calls, in
float64 and in the channels_last layout, for the softmax measure and (where marked with
`normalize`) the L1 measure. Paths that are refused must say what to do."""

import functools

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import func

from testing import compiled, reference, sparsity_ext, with_layout

LAYOUTS = ["contiguous", "channels_last"]
OUTPUTS = ("entropy", "perplexity", "sparsity")
NORMALIZATIONS = ["softmax", "l1"]
TOL = dict(rtol=1e-9, atol=1e-11)


def _input(layout, shape=(2, 3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    x[0, 1, 0, :2] = float("-inf")  # a row with masked positions
    return with_layout(x, layout)


def _mix(stats):
    """One (N, C) result that depends on all three outputs, with different weights."""
    entropy, perplexity, sparsity = stats
    return 0.7 * entropy + 0.2 * perplexity - 1.3 * sparsity


def ours(x, normalize="softmax"):
    return _mix(sparsity_ext.channel_stats(x, normalize))


def exact(x, normalize="softmax"):
    return _mix(reference.channel_stats(x, normalize))


_ours, _exact = ours, exact  # the module-level ones, for tests that shadow the names


def native_ops(normalize):
    """The (forward, backward) native ops of the measure behind ``normalize``."""
    measure = sparsity_ext.ops.measure_of(normalize)
    return measure.forward_op, measure.backward_op


def _assert_same(a, b):
    assert a.shape == b.shape
    assert torch.isfinite(b).all()  # so that agreement cannot come from NaN == NaN
    assert b.abs().max() > 1e-3     # nor from two zeros
    torch.testing.assert_close(a, b, **TOL)


def test_the_fused_kernel_is_what_gets_differentiated():
    assert compiled("cpu"), sparsity_ext._extension.load().describe()


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck_all_modes(layout, normalize):
    x = _input(layout).requires_grad_(True)
    for function in (lambda t: tuple(sparsity_ext.channel_stats(t, normalize)),
                     lambda t: ours(t, normalize)):
        assert torch.autograd.gradcheck(function, (x,), check_forward_ad=True,
                                        check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(function, (x,), check_fwd_over_rev=True,
                                            check_rev_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_op_gradcheck_and_gradgradcheck(layout, normalize):
    x = _input(layout).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
             for _ in range(3)]

    forward_op, backward_op = native_ops(normalize)

    def backward(t, *gs):
        return backward_op(t, forward_op(t)[3], *gs)

    assert torch.autograd.gradcheck(backward, (x, *grads), check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(backward, (x, *grads))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_double_backward_of_a_gradient_penalty(layout, normalize):
    """grad(create_graph=True), then grad again, on a loss mixing our op and other terms."""
    def penalty(f, x):
        x = x.detach().requires_grad_(True)
        loss = f(x).square().sum() + (x.masked_fill(x.isinf(), 0) ** 3).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), x)[0]

    x = _input(layout)
    _assert_same(penalty(lambda t: ours(t, normalize), x),
                 penalty(lambda t: exact(t, normalize), x))


def test_gradient_penalty_reaches_a_conv_weight():
    """The case that used to give an all-zero gradient: d/dw of |d loss / d input|^2."""
    g = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    w0 = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)

    def weight_grad(f):
        w = w0.clone().requires_grad_(True)
        x = inputs.clone().requires_grad_(True)
        loss = f(torch.nn.functional.conv2d(x, w, padding=1)).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), w)[0]

    _assert_same(weight_grad(ours), weight_grad(exact))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_mode(layout, normalize):
    ours, exact = (functools.partial(f, normalize=normalize) for f in (_ours, _exact))
    x = _input(layout)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
    _assert_same(func.jvp(ours, (x,), (tangent,))[1], func.jvp(exact, (x,), (tangent,))[1])
    _assert_same(func.jacfwd(ours)(x), func.jacfwd(exact)(x))

    def dual(f):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(f(forward_ad.make_dual(x, tangent))).tangent

    _assert_same(dual(ours), dual(exact))
    # the native op called directly, too
    _assert_same(dual(lambda t: _mix(native_ops(normalize)[0](t)[:3])), dual(exact))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_jacrev_and_hessian(layout, normalize):
    ours, exact = (functools.partial(f, normalize=normalize) for f in (_ours, _exact))
    x = _input(layout)
    _assert_same(func.grad(lambda t: ours(t).sum())(x), func.grad(lambda t: exact(t).sum())(x))
    _assert_same(func.jacrev(ours)(x), func.jacrev(exact)(x))
    _assert_same(func.hessian(lambda t: ours(t).sum())(x),
                 func.hessian(lambda t: exact(t).sum())(x))
    _assert_same(func.jacrev(func.jacrev(lambda t: ours(t).sum()))(x),
                 func.hessian(lambda t: exact(t).sum())(x))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_one_output_alone_under_every_transform(output, normalize):
    """The other outputs' gradients arrive as None (not materialized): each transform of a
    single output must still match the reference, at first and second order."""
    def ours(t):
        return getattr(sparsity_ext, output)(t, normalize)

    def exact(t):
        return getattr(reference, output)(t, normalize)

    x = _input("contiguous")
    _assert_same(func.jacrev(ours)(x), func.jacrev(exact)(x))
    _assert_same(func.jacfwd(ours)(x), func.jacrev(exact)(x))
    _assert_same(func.hessian(lambda t: ours(t).sum())(x), func.hessian(lambda t: exact(t).sum())(x))
    xs = torch.stack([_input("contiguous", seed=s) for s in range(3)])
    _assert_same(func.vmap(func.grad(lambda t: ours(t).sum()))(xs),
                 func.vmap(func.grad(lambda t: exact(t).sum()))(xs))
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ours(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), x)
    x64 = x.detach().clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(exact(x64).sum(), x64, create_graph=True)
    (gg64,) = torch.autograd.grad((g64 * g64).sum(), x64)
    _assert_same(g.detach(), g64.detach())
    _assert_same(gg, gg64)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_and_vmap_of_grad(layout, normalize):
    ours, exact = (functools.partial(f, normalize=normalize) for f in (_ours, _exact))
    xs = torch.stack([_input(layout, seed=s) for s in range(4)])  # (B, N, C, H, W)
    _assert_same(func.vmap(ours)(xs), func.vmap(exact)(xs))
    _assert_same(func.vmap(ours, in_dims=2)(xs.movedim(0, 2)), func.vmap(exact)(xs))
    _assert_same(func.vmap(func.grad(lambda t: ours(t).sum()))(xs),
                 func.vmap(func.grad(lambda t: exact(t).sum()))(xs))
    # the native ops under vmap without autograd
    _assert_same(func.vmap(lambda t: native_ops(normalize)[0](t)[0])(xs),
                 func.vmap(lambda t: reference.entropy(t, normalize))(xs))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_then_backward(layout):
    def grad_after_vmap(f):
        xs = torch.stack([_input(layout, seed=s) for s in range(3)]).requires_grad_(True)
        func.vmap(f)(xs).square().sum().backward()
        return xs.grad

    _assert_same(grad_after_vmap(ours), grad_after_vmap(exact))


def test_grads_batched_over_output_grads():
    x = _input("contiguous").requires_grad_(True)
    basis = torch.eye(6, dtype=torch.float64).view(6, 2, 3)
    ours_rows = torch.autograd.grad(ours(x), x, basis, is_grads_batched=True)[0]
    x64 = x.detach().requires_grad_(True)
    exact_rows = torch.autograd.grad(exact(x64), x64, basis, is_grads_batched=True)[0]
    _assert_same(ours_rows, exact_rows)


@pytest.mark.parametrize("output", range(3))
def test_torch_ops_calls_are_differentiable_like_the_public_function(output):
    x = _input("channels_last")
    a = x.clone().requires_grad_(True)
    native = torch.ops.sparsity_ext.channel_stats_forward(a)
    assert all(t.requires_grad for t in native[:3]) and not native[3].requires_grad
    b = x.clone().requires_grad_(True)
    public = sparsity_ext.channel_stats(b)
    assert torch.equal(native[output], public[output])
    (ga,) = torch.autograd.grad(native[output].sum(), a, create_graph=True)
    (gb,) = torch.autograd.grad(public[output].sum(), b, create_graph=True)
    assert torch.equal(ga, gb)
    x64 = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(reference.channel_stats(x64)[output].sum(), x64,
                                create_graph=True)
    _assert_same(ga, ge)
    _assert_same(torch.autograd.grad(ga.square().sum(), a)[0],
                 torch.autograd.grad(ge.square().sum(), x64)[0])


def test_torch_func_on_the_bare_native_op_is_refused_with_what_to_do():
    x = _input("contiguous")
    with pytest.raises(RuntimeError, match=r"call sparsity_ext\.channel_stats or "
                                           r"ChannelStatsFunction\.apply"):
        func.grad(lambda t: torch.ops.sparsity_ext.channel_stats_forward(t)[0].sum())(x)


def test_the_out_variant_is_refused_under_autograd_with_what_to_do():
    x = _input("contiguous").requires_grad_(True)
    row_stats = torch.ops.sparsity_ext.channel_stats_forward(x)[3]
    g = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"not differentiable; call "
                                           r"torch\.ops\.sparsity_ext\.channel_stats_backward"):
        torch.ops.sparsity_ext.channel_stats_backward.out(
            x, row_stats, g, g, g, grad_x=torch.empty_like(x))
    with torch.no_grad():  # nothing to differentiate: it writes grad_x
        grad_x = torch.full_like(x, float("nan"))
        torch.ops.sparsity_ext.channel_stats_backward.out(x, row_stats, g, g, g, grad_x=grad_x)
    expected = torch.ops.sparsity_ext.channel_stats_backward(x.detach(), row_stats, g, g, g)
    assert torch.equal(grad_x, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_jvp_and_double_backward_follow_float64(dtype):
    """Tangents and second derivatives accumulate in float32: within a few roundings of
    the float64 values."""
    x64 = _input("channels_last")
    tangent = torch.randn(x64.shape, generator=torch.Generator().manual_seed(4),
                          dtype=torch.float64)
    x = x64.to(dtype)
    rtol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    exact_tangent = func.jvp(exact, (x.double(),), (tangent.to(dtype).double(),))[1]
    our_tangent = func.jvp(ours, (x,), (tangent.to(dtype),))[1]
    assert our_tangent.dtype == dtype
    torch.testing.assert_close(our_tangent.double(), exact_tangent, rtol=rtol,
                               atol=rtol * exact_tangent.abs().max().item())

    def second(f, t):
        t = t.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        return torch.autograd.grad(g.square().sum(), t)[0]

    ours_second, exact_second = second(ours, x), second(exact, x.double())
    assert ours_second.dtype == dtype
    torch.testing.assert_close(ours_second.double(), exact_second, rtol=rtol,
                               atol=rtol * exact_second.abs().max().item())
