"""pytest-benchmark suites of channel_stats: ours, the eager reference and torch.compile of
the reference, forward and forward+backward, on the shapes of the results table.

    python -m pytest bench/test_channel_stats_bench.py --benchmark-group-by=param:shape,param:dtype,param:mode

`python -m sparsity_ext bench` prints the same comparison as one table with ratios and
the copy-bandwidth floor.
"""

import pytest
import torch

from sparsity_ext.app import benchmark

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, s) for d in DEVICES for s in (benchmark.CUDA_SHAPES if d == "cuda"
                                            else benchmark.CPU_SHAPES)]


@pytest.fixture(scope="module")
def implementations():
    return benchmark.implementations()


@pytest.mark.parametrize("impl", ["ours", "eager", "compile"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("device,shape", CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else v)
def test_channel_stats(benchmark_fixture, implementations, impl, mode, dtype, device, shape):
    x = benchmark.make_input(shape, benchmark.DTYPES[dtype], device)
    benchmark.check_correct(x)
    fn = implementations[impl]
    if mode == "forward":
        with torch.no_grad():
            benchmark_fixture(lambda: _synced(fn, x))
    else:
        x = x.requires_grad_(True)
        run = benchmark.forward_backward_fn(fn, x)
        benchmark_fixture(lambda: _synced(run, x))


def _synced(fn, x):
    out = fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out


@pytest.fixture
def benchmark_fixture(benchmark):
    """pytest-benchmark's fixture under a name that does not shadow sparsity_ext.benchmark."""
    return benchmark
