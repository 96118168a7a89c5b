"""The bfloat16 backward rounds grad_x with one AVX512_BF16 instruction where the CPU has it
(csrc/cpu/store_from_float.h) and with at::vec's integer rounding elsewhere: the same bits
either way (a NaN's sign and payload aside), subnormal results included, which the
instruction would flush and which therefore take at::vec's path. The choice is made once
per process, so each way runs in a child process (SPARSITY_EXT_AVX512_BF16=0 forces
at::vec), which checks that the library reports the way it was asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testing import compiled

CHILD = r'''
import sys
import torch
import sparsity_ext
from sparsity_ext import ops

assert sparsity_ext._extension.kernel_available("cpu"), "the fused CPU kernels are not loaded"
native = "bfloat16 rounded by AVX512_BF16" in sparsity_ext._extension.load().cpu_kernels
assert native == (sys.argv[2] == "native"), sparsity_ext._extension.load().cpu_kernels
generator = torch.Generator().manual_seed(0)
results = []
for normalize in ("softmax", "l1"):
    measure = ops.measure_of(normalize)
    # short rows (tiles, tails), long rows, 1-D rows; both layouts; x scaled up so that
    # some rows are nearly one-hot (tiny softmax gradients).
    for shape, scale in [((4, 37, 7, 7), 1.0), ((2, 9, 5, 7), 40.0), ((2, 8, 32, 33), 1.0),
                         ((3, 5, 1000), 8.0), ((2, 3, 17), 1.0)]:
        for channels_last in (False, True):
            x = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
            if channels_last:
                perm = [0, *range(2, x.dim()), 1]
                x = x.permute(perm).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
            stats = measure.forward_op(x)[3]
            # Output gradients of 1, of 3e-37 (grad_x then mostly subnormal) and of 3e38
            # (grad_x near the largest bfloat16, rounding up to inf, inf, NaN).
            for grad_scale in (1.0, 3e-37, 3e38):
                grads = [(torch.randn(shape[:2], generator=generator) * grad_scale)
                         .to(torch.bfloat16) for _ in range(3)]
                results.append(measure.backward_op(x, stats, *grads))
torch.save(results, sys.argv[1])
'''

ROOT = Path(__file__).resolve().parents[1]


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags and torch.backends.cpu.get_cpu_capability() == "AVX512"


def backward_results(tmp_path: Path, native: bool) -> list[torch.Tensor]:
    out = tmp_path / f"native_{native}.pt"
    env = dict(os.environ)
    env.pop("SPARSITY_EXT_AVX512_BF16", None)
    if not native:
        env["SPARSITY_EXT_AVX512_BF16"] = "0"
    way = "native" if native else "at::vec"
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), way], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    return torch.load(out)


@pytest.mark.skipif(not compiled("cpu"), reason="the compiled CPU kernel is not available")
@pytest.mark.skipif(not cpu_has_avx512_bf16(),
                    reason="this CPU has no AVX512_BF16 (or ATen runs below AVX512): one way")
def test_native_and_at_vec_rounding_store_the_same_bits(tmp_path):
    native, at_vec = backward_results(tmp_path, True), backward_results(tmp_path, False)
    assert len(native) == len(at_vec) == 60
    subnormal = infinite = 0
    for a, b in zip(native, at_vec):
        assert a.stride() == b.stride()
        both_nan = a.isnan() & b.isnan()
        assert torch.equal(a.view(torch.int16)[~both_nan], b.view(torch.int16)[~both_nan])
        magnitude = b.float().abs()
        subnormal += int(((magnitude > 0) & (magnitude < torch.finfo(torch.float32).tiny)).sum())
        infinite += int(magnitude.isinf().sum())
    assert subnormal > 1000 and infinite > 100  # the inputs reach those values
