"""The two native kernels of a measure alone, for comparing builds of them.

    python bench/kernel_times.py [--measure softmax|l1] [--threads 1] [--repeats 101]
                                 [SHAPE:DTYPE ...]

Calls the measure's forward and backward ops (softmax: ``channel_stats_forward`` and
``channel_stats_backward``; l1: ``l1_stats_*``) directly (no autograd, no Python wrapper),
alternating them call by call, and prints the minimum, the median and the 90th percentile
in ms of each. On a shared machine the minimum of many one-thread calls is
the steadiest figure for an A/B of kernel changes; run the two checkouts in alternating
processes, each with its own ``SPARSITY_EXT_CACHE`` and ``PYTHONPATH``, several times. How
the op compares with eager PyTorch, torch.compile and a copy is ``python -m sparsity_ext
bench``'s job.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsity_ext import _extension
from sparsity_ext.app.benchmark import make_input, percentile

DEFAULT_CASES = ["128x512x7x7:float32", "128x512x7x7:bfloat16", "128x64x32x32:bfloat16"]


def parse_case(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    shape_text, _, dtype_name = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.split("x"))
    except ValueError:
        shape = ()
    dtype = getattr(torch, dtype_name or "float32", None)
    if len(shape) < 3 or min(shape) < 1 or not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"{text!r}: expected N x C x spatial dims, positive, "
                                         "then :DTYPE, e.g. 128x512x7x7:float32")
    return shape, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", type=parse_case,
                        help=f"default: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--measure", choices=["softmax", "l1"], default="softmax")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=101)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    if not _extension.kernel_available("cpu"):
        raise SystemExit(f"no native CPU kernel to time: {_extension.load().describe()}")
    torch.set_num_threads(args.threads)
    name = {"softmax": "channel_stats", "l1": "l1_stats"}[args.measure]
    forward = getattr(torch.ops.sparsity_ext, f"{name}_forward")
    backward = getattr(torch.ops.sparsity_ext, f"{name}_backward")
    for shape, dtype in args.cases or [parse_case(c) for c in DEFAULT_CASES]:
        x = make_input(shape, dtype, "cpu")
        row_stats = forward(x)[3]
        grads = [torch.randn(shape[:2]).to(dtype) for _ in range(3)]
        backward(x, row_stats, *grads)  # a warm-up call of each
        calls = {"forward": lambda: forward(x),
                 "backward": lambda: backward(x, row_stats, *grads)}
        times: dict[str, list[float]] = {kind: [] for kind in calls}
        for _ in range(args.repeats):
            for kind, call in calls.items():
                start = time.perf_counter()
                call()
                times[kind].append((time.perf_counter() - start) * 1e3)
        text = "  ".join(f"{kind} min {min(t):.3f} median {statistics.median(t):.3f} "
                         f"p90 {percentile(t, 90):.3f}" for kind, t in times.items())
        case = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
        print(f"{case}: {text} ms", flush=True)


if __name__ == "__main__":
    main()
