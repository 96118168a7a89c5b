"""The CPU kernels touch only their tensors' own elements: each tensor is placed so that
its last element ends a page and the next page is unreadable (PROT_NONE), so a load or
store past it (a mask too wide, a tile or vector read beyond the last row) kills the
process with SIGSEGV. That cannot be caught in-process, so the checks run in a child
process, and the child's exit status and output are the test's result."""

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


def at_page_end(shape, dtype):
    """An uninitialised dense tensor of `shape` whose last byte ends a page followed by an
    unreadable page."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pages = nbytes // PAGE + 1
    buffer = mmap.mmap(-1, (pages + 1) * PAGE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    if libc.mprotect(start + pages * PAGE, PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    keep.append(buffer)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=pages * PAGE - nbytes)
    return flat.view(dtype).view(shape)


def guarded(shape, dtype, channels_last, generator):
    """Standard normal x at a page end, in the rows layout or channels innermost."""
    stored = [shape[0], *shape[2:], shape[1]] if channels_last else list(shape)
    x = at_page_end(stored, dtype)
    x.copy_(torch.randn(stored, generator=generator).to(dtype))
    if channels_last:
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return x


generator = torch.Generator().manual_seed(0)
for shape in [(1, 16, 7, 7), (2, 9, 5, 7), (1, 16, 2, 9), (3, 5, 1), (1, 1, 2), (2, 3, 17),
              (1, 16, 8, 8), (2, 3, 8193), (1, 20, 13, 11)]:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for channels_last in (False, True):
            x = guarded(shape, dtype, channels_last, generator)
            for normalize, measure in (("softmax", "channel_stats"), ("l1", "l1_stats")):
                forward = getattr(torch.ops.sparsity_ext, f"{measure}_forward").default
                backward = getattr(torch.ops.sparsity_ext, f"{measure}_backward").out
                *outputs, row_stats = forward(x)
                grads = [torch.randn(shape[:2], generator=generator).to(dtype) for _ in range(3)]
                # grad_x at a page end too, in x's layout (the kernels write grad_x's layout)
                grad_x = guarded(shape, dtype, channels_last, generator)
                backward(x, row_stats, *grads, grad_x=grad_x)
                expected = ops.channel_stats(x.double(), normalize)
                assert torch.allclose(outputs[0].double(), expected.entropy, rtol=2e-2,
                                      atol=2e-2), (shape, dtype, channels_last, normalize)
                assert torch.isfinite(grad_x).all(), (shape, dtype, channels_last, normalize)
            sums = torch.zeros(len(ops.MONITOR_COLUMNS), dtype=torch.float64)
            ops.monitor_sums_(sums, x)
            assert sums[ops.MONITOR_COLUMNS.index("rows")] == shape[0] * shape[1]
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
