"""Shared lists and helpers of the test suite (devices, dtypes, layouts, tolerances)."""

from __future__ import annotations

import torch

import sparsity_ext
from sparsity_ext import _extension, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "batch_sliced",
           "channels_last_batch_sliced", "expanded"]

# Relative size of one rounding of the result to its dtype; float32/64 accumulate exactly
# enough that a few ulps of the accumulation type bound the error.
ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-23,
            torch.float64: 2.0**-52}


def at_thread_counts(counts, fn) -> list:
    """[fn() with torch.set_num_threads(n) for each n in counts], the count restored after."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


def compiled(device: str) -> bool:
    """True when the fused kernel (not the reference fallback) serves this device."""
    return _extension.kernel_available(device)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        # (N, C, *S) stored as (N, *S, C): channels innermost, for any number of spatial dims.
        perm = [0, *range(2, x.dim()), 1]
        inverse = [0, x.dim() - 1, *range(1, x.dim() - 1)]
        return x.permute(perm).contiguous().permute(inverse)
    if layout == "sliced":
        # Every other channel of a wider tensor: read in place with a channel stride.
        wide = torch.stack([x, torch.randn_like(x)], dim=2).flatten(1, 2)
        return wide[:, ::2]
    if layout in ("batch_sliced", "channels_last_batch_sliced"):
        # Every other sample of a twice larger batch: read in place with a batch stride.
        inner = "contiguous" if layout == "batch_sliced" else "channels_last"
        wide = with_layout(torch.randn((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                                       device=x.device), inner)
        wide[::2] = x
        return wide[::2]
    if layout == "expanded":
        # One sample seen N times (batch stride 0): read in place, never copied.
        return x[:1].expand_as(x)
    if layout == "permuted":
        # Spatial dims reversed in memory: neither layout, so the op copies once.
        perm = [0, 1, *reversed(range(2, x.dim()))]
        return x.permute(perm).contiguous().permute(perm)
    raise ValueError(layout)


def random_input(shape, dtype, device="cpu", scale=3.0, offset=0.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)


def low_precision_reference(x: torch.Tensor) -> reference.ChannelStats:
    """The measure computed by plain PyTorch ops in x's own dtype, with no upcast: the yard
    stick for half precision (our error may be at most a small multiple of its error)."""
    rows = x.flatten(2)
    log_p = torch.log_softmax(rows, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    perplexity = entropy.exp()
    length = rows.shape[-1]
    sparsity = (perplexity - length) * reference.sparsity_slope(length)
    return reference.ChannelStats(entropy, perplexity, sparsity)


def assert_close_to_float64(ours, exact, dtype, rtol_acc=2e-5, atol=1e-6, what=""):
    """Error of a result in `dtype` against the float64 reference: one rounding of the
    result to `dtype` plus accumulation error (rtol_acc relative, atol absolute)."""
    ours64 = ours.double()
    error = (ours64 - exact).abs()
    # Below the smallest normal number the rounding step is absolute (subnormal spacing).
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = (ROUNDING[dtype] + rtol_acc) * exact.abs() + atol + subnormal_step
    # Values beyond the dtype's range (a perplexity over 65504 in float16) round to inf.
    overflow = torch.isinf(exact.to(dtype)) & (ours64 == exact.to(dtype).double())
    bad = ~(error <= bound) & ~(exact.isnan() & ours64.isnan()) & ~overflow
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values off; first at {i}: "
            f"ours {ours64[tuple(i)].item():.9g}, exact {exact[tuple(i)].item():.9g}, "
            f"bound {bound[tuple(i)].item():.3g}")


__all__ = ["DTYPES", "DEVICES", "LAYOUTS", "sparsity_ext", "reference", "compiled",
           "with_layout", "random_input", "low_precision_reference", "assert_close_to_float64"]
