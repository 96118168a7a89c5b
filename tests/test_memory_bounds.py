"""The CPU kernels touch only their tensors' own elements: each tensor (x and grad_x) is
placed so that it ends a page followed by an unreadable page (PROT_NONE), and again so that
it starts a page preceded by one, so a load or store past either end (a mask too wide, a
tile or vector read beyond the last row) kills the process with SIGSEGV. That cannot be
caught in-process, so the checks run in a child process, and the child's exit status and
output are the test's result. The child also checks the values against float64, so a
kernel that wrote somewhere harmless instead would fail too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testing import compiled

CHILD = r'''
import ctypes, math, mmap, sys
import torch
import sparsity_ext
from sparsity_ext import ops

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
keep = []  # the mappings must outlive their tensors


def between_guards(shape, dtype, at_end):
    """An uninitialised dense tensor of `shape` that ends a page followed by an unreadable
    one (at_end) or starts a page preceded by one."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pages = nbytes // PAGE + 1
    buffer = mmap.mmap(-1, (pages + 2) * PAGE)  # guard, data pages, guard
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    for guard in (start, start + (pages + 1) * PAGE):
        if libc.mprotect(guard, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    keep.append(buffer)
    offset = (pages + 1) * PAGE - nbytes if at_end else PAGE
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def guarded(shape, dtype, channels_last, at_end, generator):
    """Standard normal values between guard pages, in the rows layout or channels innermost."""
    stored = [shape[0], *shape[2:], shape[1]] if channels_last else list(shape)
    x = between_guards(stored, dtype, at_end)
    x.copy_(torch.randn(stored, generator=generator).to(dtype))
    if channels_last:
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return x


assert sparsity_ext._extension.kernel_available("cpu"), "the fused CPU kernels are not loaded"
print("CPU capability", torch.backends.cpu.get_cpu_capability())
generator = torch.Generator().manual_seed(0)
for shape in [(1, 16, 7, 7), (2, 9, 5, 7), (1, 16, 2, 9), (3, 5, 1), (1, 1, 2), (2, 3, 17),
              (1, 16, 8, 8), (2, 3, 8193), (1, 20, 13, 11)]:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for channels_last, at_end in [(False, True), (True, True), (False, False), (True, False)]:
            case = (shape, dtype, "channels_last" if channels_last else "rows",
                    "end" if at_end else "start")
            x = guarded(shape, dtype, channels_last, at_end, generator)
            for normalize, measure in (("softmax", "channel_stats"), ("l1", "l1_stats")):
                forward = getattr(torch.ops.sparsity_ext, f"{measure}_forward").default
                backward = getattr(torch.ops.sparsity_ext, f"{measure}_backward").out
                grads = [torch.randn(shape[:2], generator=generator).to(dtype) for _ in range(3)]
                # grad_x between guards too, in x's layout (the kernels write grad_x's layout)
                grad_x = guarded(shape, dtype, channels_last, at_end, generator)
                with torch.no_grad():
                    *outputs, row_stats = forward(x)
                    backward(x, row_stats, *grads, grad_x=grad_x)
                x64 = x.double().requires_grad_(True)
                expected = ops.channel_stats(x64, normalize)
                expected_grad, = torch.autograd.grad(
                    expected, x64, [g.double() for g in grads])
                for ours, exact in zip(outputs, expected):
                    assert torch.allclose(ours.double(), exact, rtol=2e-2, atol=2e-2), case
                # a row with one live value has an exact zero gradient: ours is then a
                # rounding of the float accumulation, not zero
                scale = expected_grad.abs().max().item()
                assert torch.allclose(grad_x.double(), expected_grad, rtol=2e-2,
                                      atol=2e-2 * scale + 1e-5), case
            native = torch.zeros(len(ops.MONITOR_COLUMNS), dtype=torch.float64)
            ops.monitor_sums_(native, x)
            fallback = torch.zeros_like(native)
            ops._monitor_sums_fallback(fallback, x)
            assert torch.allclose(native, fallback, rtol=2e-2, atol=2e-2), case
print("ok")
'''


@pytest.mark.skipif(not compiled("cpu"), reason="the fused CPU kernels are not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect via libc (Linux)")
def test_cpu_kernels_touch_nothing_past_their_tensors():
    child = subprocess.run([sys.executable, "-c", CHILD], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), (
        f"exit status {child.returncode} (-11: a kernel touched the unreadable page past a "
        f"tensor)\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
