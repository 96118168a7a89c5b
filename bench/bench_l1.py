"""The fused L1 ops beside the fused softmax ops, same inputs, same process.

    python bench/bench_l1.py [--repeats 21] [--threads 2] [--clock wall|cpu]

Checks each L1 result against the float64 reference first, then times forward and
forward+backward (native ops called directly, grads of ones), interleaving the two measures
round by round so that machine noise hits both alike. Prints medians in ms and the ratio
l1/softmax per case (below 1: the L1 measure is faster). ``--clock cpu`` times the CPU
time of this process (use it with ``--threads 1`` on a shared, loaded machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsity_ext import _extension, reference

SHAPES = [(64, 64, 56, 56), (128, 64, 32, 32), (128, 512, 7, 7)]
DTYPES = [torch.float32, torch.bfloat16]
OPS: dict = {}  # filled once the extension is loaded: name -> (forward op, backward op)


def forward_only(name, x, grads):
    return OPS[name][0](x)


def forward_backward(name, x, grads):
    forward, backward = OPS[name]
    *_, row_stats = forward(x)
    return backward(x, row_stats, *grads)


def check(x):
    ours = OPS["l1"][0](x)[:3]
    exact = reference.channel_stats(x.double(), normalize="l1")
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    assert "cpu" in _extension.load().devices, _extension.load().describe()
    ops = torch.ops.sparsity_ext
    OPS["softmax"] = (ops.channel_stats_forward, ops.channel_stats_backward)
    OPS["l1"] = (ops.l1_stats_forward, ops.l1_stats_backward)
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"torch {torch.__version__}; median of {args.repeats}, {args.clock} clock")
    print("| shape | dtype | mode | softmax ms | l1 ms | l1/softmax |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in DTYPES:
            torch.manual_seed(0)
            x = torch.randn(shape).to(dtype)
            grads = [torch.ones(shape[:2], dtype=dtype) for _ in range(3)]
            check(x)
            for mode, fn in [("forward", forward_only), ("forward+backward", forward_backward)]:
                times = {name: [] for name in OPS}
                for name in OPS:  # warm-up
                    fn(name, x, grads)
                for _ in range(args.repeats):
                    for name in OPS:
                        start = clock()
                        fn(name, x, grads)
                        times[name].append(clock() - start)
                soft, l1 = (statistics.median(times[n]) * 1e3 for n in ("softmax", "l1"))
                print(f"| {'x'.join(map(str, shape))} | {str(dtype).split('.')[1]} | {mode} "
                      f"| {soft:.3g} | {l1:.3g} | {l1 / soft:.2f} |")


if __name__ == "__main__":
    main()
