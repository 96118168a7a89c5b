"""Overhead of SparsityMonitor (every conv activation monitored) on one training step.

    python bench/bench_monitor.py                      # the fused op, if it is built
    SPARSITY_EXT_NO_EXTENSION=1 python bench/bench_monitor.py   # the pure-PyTorch reference

A step is forward, cross-entropy, backward and an Adam update. Variants: no hooks; the
monitor (no_grad statistics per conv activation); the monitor with SparsityPenalty (the
statistics computed with autograd and back-propagated, so this one also costs backward
work). Each timed sample is ``--steps`` steps (default 1) of one variant, the variants
interleaved sample by sample so that the shared machine's slow spells hit them alike; the
monitor's ``end_epoch`` runs every ``--epoch-steps`` steps and its cost is spread over
them. The table gives the median sample per step, the overhead of the medians relative to
no hooks, and p20..p80 of the per-sample ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsity_ext import _extension
from sparsity_ext.monitor import SparsityMonitor, SparsityPenalty
from sparsity_ext.app.models import build_model

# (name, model, batch, channels, image size): the default digits run, CIFAR-10 shapes, and
# torchvision's resnet18 (every relu call monitored: 17 records per step at 64 x 64).
CASES = [
    ("digits vgg (default run)", "vgg", 32, 1, 8),
    ("cifar10 vgg", "vgg", 128, 3, 32),
    ("cifar10 resnet", "resnet", 128, 3, 32),
    ("torchvision resnet18", "torchvision.resnet18", 32, 3, 64),
]
VARIANTS = ["no hooks", "monitor", "monitor + penalty"]


def make_step(
    model_name: str, batch: int, channels: int, size: int, variant: str, device: torch.device
):
    torch.manual_seed(0)
    if model_name.startswith("torchvision."):
        import torchvision

        model = getattr(torchvision.models, model_name.partition(".")[2])(num_classes=10)
    else:
        model = build_model(model_name, channels, 10, size)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    monitor = SparsityMonitor(model) if variant != "no hooks" else None
    penalty = SparsityPenalty(monitor, 0.1) if variant == "monitor + penalty" else None

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, monitor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case, device: torch.device, rounds: int, steps: int, clock,
            epoch_steps: int) -> dict[str, list[float]]:
    """Per-step times of each variant, ``rounds`` samples of ``steps`` steps, the variants
    interleaved sample by sample (so that the machine's slow spells hit them alike). A
    monitor's ``end_epoch`` runs every ``epoch_steps`` steps; its mean cost per step is
    added to each of that variant's samples."""
    _, model_name, batch, channels, size = case
    runs = {v: make_step(model_name, batch, channels, size, v, device) for v in VARIANTS}
    for step, _ in runs.values():  # warm-up
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    epoch_cost: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for done in range(1, rounds + 1):
        for variant, (step, monitor) in runs.items():
            sync(device)
            start = clock()
            for _ in range(steps):
                step()
            sync(device)
            times[variant].append((clock() - start) / steps)
            if monitor is not None and (done * steps) % epoch_steps < steps:
                start = clock()
                monitor.end_epoch(0)  # the once-per-epoch reduction
                sync(device)
                epoch_cost[variant].append(clock() - start)
    for variant, costs in epoch_cost.items():
        per_step = statistics.mean(costs) / epoch_steps if costs else 0.0
        times[variant] = [t + per_step for t in times[variant]]
    return times


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[round(q * 10) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=301, help="timed samples per variant")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed sample")
    parser.add_argument("--epoch-steps", type=int, default=45,
                        help="steps per epoch: how often the monitor's end_epoch runs "
                        "(45: the default digits run, 1437 training images in batches of 32)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, robust to other load on the machine "
        "(use with --threads 1, where no thread spins waiting)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device(args.device)
    op = "fused kernel" if _extension.kernel_available(device.type) else "pure-PyTorch reference"
    print(
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"channel_stats: {op}; {args.clock} clock, "
        f"median of {args.rounds} samples x {args.steps} steps, variants interleaved per "
        f"sample, end_epoch every {args.epoch_steps} steps"
    )
    print(f"{'case':<26} {'variant':<19} {'ms/step':>9} {'overhead':>9} {'p20..p80':>17}")
    for case in [c for c in CASES if args.only in c[0]]:
        times = measure(case, device, args.rounds, args.steps, clock, args.epoch_steps)
        base = statistics.median(times["no hooks"])
        for variant in VARIANTS:
            med = statistics.median(times[variant])
            ratios = [t / b - 1 for t, b in zip(times[variant], times["no hooks"])]
            spread = f"{quantile(ratios, 0.2):+.1%}..{quantile(ratios, 0.8):+.1%}"
            overhead = "" if variant == "no hooks" else f"{med / base - 1:+.1%}"
            print(
                f"{case[0]:<26} {variant:<19} {med * 1e3:9.2f} {overhead:>9} "
                f"{'' if variant == 'no hooks' else spread:>17}"
            )


if __name__ == "__main__":
    main()
