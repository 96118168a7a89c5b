"""`python -m sparsity_ext bench`: ours against eager PyTorch, torch.compile and the
copy-bandwidth floor, all measured in the same process on the same input.

The floor is the bytes the op must move over the copy bandwidth measured here (a
preallocated ``dst.copy_(x)`` moves 2 |x| bytes): the forward reads x once (|x|), the
forward+backward reads x twice and writes grad_x once (3 |x|).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from . import ops, reference

CPU_SHAPES = [(64, 64, 56, 56), (128, 64, 32, 32), (128, 512, 7, 7)]
CUDA_SHAPES = CPU_SHAPES + [(128, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28),
                            (1024, 2048, 7, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def make_input(shape, dtype, device) -> torch.Tensor:
    """The benchmark input: standard normal activations, the shared factory of bench/."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def forward_backward_fn(impl: Callable, x: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """Forward of all three outputs, then the gradient of a weighted sum of them."""
    grads = [torch.randn(x.shape[:2], device=x.device, dtype=x.dtype) for _ in range(3)]

    def run(inp):
        out = impl(inp)
        return torch.autograd.grad(tuple(out), inp, grads)[0]

    return run


def implementations() -> dict[str, Callable]:
    """Fresh compiled reference each time: no dynamic-shape reuse across cases."""
    torch._dynamo.reset()
    return {
        "ours": ops.channel_stats,
        "eager": reference.channel_stats,
        "compile": torch.compile(reference.channel_stats, dynamic=False),
    }


def time_ms(fn: Callable, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time in milliseconds (CUDA: events on the current stream)."""
    for _ in range(warmup):
        fn(x)
    samples = []
    if x.is_cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn(x)
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def peak_extra_mb(fn: Callable, x: torch.Tensor) -> float | None:
    """Peak CUDA memory allocated during fn beyond what was live before, in MB."""
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def check_correct(x: torch.Tensor) -> None:
    """Benchmarks check correctness before they time."""
    ours = ops.channel_stats(x).entropy.double()
    exact = reference.channel_stats(x.double()).entropy
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(ours, exact, rtol=tol, atol=tol):
        raise AssertionError(f"ours disagrees with the reference on {tuple(x.shape)} {x.dtype}")


@dataclass
class Case:
    device: str
    shape: tuple
    dtype: str


def run_case(case: Case, repeats: int) -> list[dict]:
    x = make_input(case.shape, DTYPES[case.dtype], case.device)
    check_correct(x)
    dst = torch.empty_like(x)
    copy_ms = time_ms(lambda t: dst.copy_(t), x, repeats)
    bandwidth = 2 * x.nbytes / (copy_ms * 1e-3)  # bytes per second
    impls = implementations()
    rows = []
    for mode, bytes_moved in (("forward", x.nbytes), ("forward+backward", 3 * x.nbytes)):
        xr = x.detach().requires_grad_(mode != "forward")
        times, peak = {}, None
        for name, impl in impls.items():
            fn = impl if mode == "forward" else forward_backward_fn(impl, xr)
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                times[name] = time_ms(fn, xr, repeats)
                if name == "ours":
                    peak = peak_extra_mb(fn, xr)
        floor_ms = bytes_moved / bandwidth * 1e3
        rows.append({
            "device": case.device, "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
            "mode": mode, "ours ms": times["ours"], "eager ms": times["eager"],
            "compile ms": times["compile"], "floor ms": floor_ms,
            "ours/eager": times["ours"] / times["eager"],
            "ours/compile": times["ours"] / times["compile"],
            "ours/floor": times["ours"] / floor_ms,
            "copy-BW fraction": floor_ms / times["ours"],
            "peak extra MB": peak, "x MB": x.nbytes / 2**20,
        })
    return rows


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table without extra dependencies."""
    def fmt(v):
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def machine_line(device: str) -> str:
    if device == "cuda":
        return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return (f"CPU ({torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}")


def main(device: str | None = None, dtypes: list[str] | None = None, repeats: int = 15,
         out: str | None = None) -> pd.DataFrame:
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtypes = dtypes or ["float32", "bfloat16"]
    rows = []
    for dev in devices:
        shapes = CUDA_SHAPES if dev == "cuda" else CPU_SHAPES
        for shape in shapes:
            for dtype in dtypes:
                rows.extend(run_case(Case(dev, shape, dtype), repeats))
    df = pd.DataFrame(rows)
    report = []
    for dev in devices:
        part = df[df.device == dev]
        if dev != "cuda":
            part = part.drop(columns=["peak extra MB"])
        report += [f"{machine_line(dev)}; median of {repeats}", "", to_markdown(part), ""]
    text = "\n".join(report)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        title = f"# `python -m sparsity_ext bench`, {time.strftime('%Y-%m-%d')}"
        Path(out).write_text(f"{title}\n\n{text}")
    return df
