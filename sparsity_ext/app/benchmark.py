"""`python -m sparsity_ext bench`: ours against eager PyTorch, torch.compile and the
copy-bandwidth floor, all measured in the same process on the same input, for both
measures (``normalize`` column: the softmax one and the L1 one).

The floor is the bytes the op must move over the copy bandwidth measured here (a
preallocated ``dst.copy_(x)`` moves 2 |x| bytes): the forward reads x once (|x|), the
forward+backward reads x twice and writes grad_x once (3 |x|).

On CUDA every figure (the copy included) is device time per call: one CUDA graph holds one
call on each of several copies of the input, at least :data:`CUDA_ROTATION_BYTES` in all,
so no call finds its input in L2 and no launch gap is timed; its replays are timed with
events. Should a capture fail, the same calls are timed launched back to back instead,
and the table's ``timing`` column says so.

On the CPU each call is timed on its own, as a user sees it: every (case, mode,
implementation) runs in a fresh process, its median and 90th percentile are reported, and
so is the 90th percentile when other allocations come between the calls (:func:`churn`),
which is when fresh memory costs page faults (see csrc/cpu/recycled_buffers.h).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .. import ops, reference

CPU_SHAPES = [(64, 64, 56, 56), (128, 64, 32, 32), (128, 512, 7, 7)]
CUDA_SHAPES = CPU_SHAPES + [(128, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28),
                            (1024, 2048, 7, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
NORMALIZATIONS = ("softmax", "l1")  # the two measures (normalize= of sparsity_ext.channel_stats)


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


def implementations(normalize: str = "softmax") -> dict[str, Callable]:
    """Fresh compiled reference each time: no dynamic-shape reuse across cases."""
    torch._dynamo.reset()
    exact = functools.partial(reference.channel_stats, normalize=normalize)
    return {
        "ours": functools.partial(ops.channel_stats, normalize=normalize),
        "eager": exact,
        "compile": torch.compile(exact, dynamic=False),
    }


def time_samples(fn: Callable, x: torch.Tensor, repeats: int, warmup: int = 3,
                 between: Callable[[], object] | None = None) -> list[float]:
    """Wall time of each of ``repeats`` calls ``fn(x)`` in milliseconds (CPU), after
    ``warmup`` untimed calls (torch.compile compiles in its first); ``between`` runs untimed
    before each timed call."""
    for _ in range(warmup):
        fn(x)
    samples = []
    for _ in range(repeats):
        if between is not None:
            between()
        begin = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def time_ms(fn: Callable, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, each call timed on its own (CPU)."""
    return statistics.median(time_samples(fn, x, repeats, warmup))


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of the samples, linear between order statistics."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def churn(nbytes: int) -> None:
    """Allocate, write and free tensors of many sizes, 2 ``nbytes`` in all, with every
    other one freed early: what the rest of a training step does between two calls. Memory
    the allocator hands out next is then fresh (page faults) or fragmented."""
    sizes = [2**12, 2**16, 2**20, 2**24, max(nbytes // 2, 2**12), nbytes]
    kept, total, i = [], 0, 0
    while total < 2 * nbytes:
        t = torch.ones(sizes[i % len(sizes)] // 4)
        total += t.nbytes
        if i % 2:
            kept.append(t)
        i += 1
    del kept


# Bytes of input copies one CUDA timing rotates over: several times any GPU's L2 (50 MB on
# an H100, 60 MB on an H200), so each call reads its input from device memory.
CUDA_ROTATION_BYTES = 256 * 2**20
MAX_ROTATION_COPIES = 64  # the benchmark shapes need at most 42; tiny inputs stay cached


def rotation(x: torch.Tensor) -> list[torch.Tensor]:
    """x and enough copies of it to hold :data:`CUDA_ROTATION_BYTES` (just x if it does),
    at most :data:`MAX_ROTATION_COPIES` in all."""
    copies = min(MAX_ROTATION_COPIES, max(1, math.ceil(CUDA_ROTATION_BYTES / max(x.nbytes, 1))))
    return [x] + [x.detach().clone().requires_grad_(x.requires_grad) for _ in range(copies - 1)]


def time_cuda_ms(calls: list[Callable[[], object]], repeats: int, warmup: int = 3
                 ) -> tuple[float, str]:
    """Median device time per call of ``calls`` (one pass over them), in milliseconds, and
    how it was timed: ``"graph"`` (replays of a CUDA graph of the pass) or ``"stream"``
    (the pass launched back to back, if the capture failed)."""
    def run_pass() -> None:
        for call in calls:
            call()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as capture requires
        for _ in range(warmup):
            run_pass()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    how = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_pass()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        how, run = "stream", run_pass
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / len(calls))
    return statistics.median(samples), how


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


def check_correct(x: torch.Tensor, normalize: str = "softmax") -> None:
    """Benchmarks check correctness before they time."""
    ours = ops.channel_stats(x, normalize).entropy.double()
    exact = reference.channel_stats(x.double(), normalize).entropy
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(ours, exact, rtol=tol, atol=tol):
        raise AssertionError(f"ours disagrees with the reference on {tuple(x.shape)} {x.dtype} "
                             f"(normalize={normalize!r})")


@dataclass
class Case:
    device: str
    shape: tuple
    dtype: str
    normalize: str = "softmax"


def timed_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs one timing cycles through: a :func:`rotation` of x on CUDA, x on the CPU."""
    return rotation(x) if x.is_cuda else [x]


def time_per_call(fn: Callable, inputs: list[torch.Tensor], repeats: int) -> tuple[float, str]:
    """(ms per call of fn on one input, how it was timed): :func:`time_cuda_ms` over every
    input on CUDA, :func:`time_ms` on the CPU."""
    if inputs[0].is_cuda:
        return time_cuda_ms([functools.partial(fn, t) for t in inputs], repeats)
    return time_ms(fn, inputs[0], repeats), "per call"


MODES = {"forward": 1, "forward+backward": 3}  # mode: bytes moved, in units of |x|


def cpu_series(case: Case, mode: str, impl_name: str, repeats: int) -> dict[str, float]:
    """One CPU timing series, in this process: median and p90 of ``repeats`` calls, then p90
    with :func:`churn` before each call. Meant to run in a fresh process (:func:`run_case`)."""
    x = make_input(case.shape, DTYPES[case.dtype], "cpu")
    if impl_name == "copy":
        dst = torch.empty_like(x)
        samples = time_samples(lambda t: dst.copy_(t), x, repeats)
        return {"median": statistics.median(samples)}
    impl = implementations(case.normalize)[impl_name]
    xr = x.detach().requires_grad_(mode != "forward")
    fn = impl if mode == "forward" else forward_backward_fn(impl, xr)
    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        samples = time_samples(fn, xr, repeats)
        churned = time_samples(fn, xr, repeats, warmup=0, between=lambda: churn(x.nbytes))
    return {"median": statistics.median(samples), "p90": percentile(samples, 90),
            "churn p90": percentile(churned, 90)}


def fresh_process_series(case: Case, mode: str, impl_name: str, repeats: int) -> dict:
    """:func:`cpu_series` in a new Python process."""
    code = ("import json, sys\n"
            "from sparsity_ext.app import benchmark as b\n"
            "case, mode, impl, repeats = json.loads(sys.argv[1])\n"
            "print(json.dumps(b.cpu_series(b.Case(**case), mode, impl, repeats)))\n")
    argument = json.dumps([{"device": case.device, "shape": list(case.shape), "dtype": case.dtype,
                            "normalize": case.normalize}, mode, impl_name, repeats])
    child = subprocess.run([sys.executable, "-c", code, argument], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child failed on {case} {mode} {impl_name}:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_case(case: Case, repeats: int) -> list[dict]:
    x = make_input(case.shape, DTYPES[case.dtype], case.device)
    check_correct(x, case.normalize)
    if not x.is_cuda:
        return cpu_rows(case, x, repeats)
    inputs = timed_inputs(x)
    destinations = {id(t): torch.empty_like(t) for t in inputs}  # preallocated, one each
    copy_ms, _ = time_per_call(lambda t: destinations[id(t)].copy_(t), inputs, repeats)
    del inputs, destinations
    bandwidth = 2 * x.nbytes / (copy_ms * 1e-3)  # bytes per second
    impls = implementations(case.normalize)
    rows = []
    for mode, units in MODES.items():
        xr = x.detach().requires_grad_(mode != "forward")
        inputs = timed_inputs(xr)
        times, hows, peak = {}, set(), None
        for name, impl in impls.items():
            fn = impl if mode == "forward" else forward_backward_fn(impl, xr)
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                times[name], how = time_per_call(fn, inputs, repeats)
                hows.add(how)
                if name == "ours":
                    peak = peak_extra_mb(fn, xr)
        del inputs
        floor_ms = units * x.nbytes / bandwidth * 1e3
        rows.append(summary_row(case, mode, x, times, floor_ms) | {
            "peak extra MB": peak, "timing": ", ".join(sorted(hows))})
    return rows


def cpu_rows(case: Case, x: torch.Tensor, repeats: int) -> list[dict]:
    """The CPU rows of a case, every series from a fresh process."""
    copy_ms = fresh_process_series(case, "copy", "copy", repeats)["median"]
    bandwidth = 2 * x.nbytes / (copy_ms * 1e-3)  # bytes per second
    rows = []
    for mode, units in MODES.items():
        series = {name: fresh_process_series(case, mode, name, repeats)
                  for name in ("ours", "eager", "compile")}
        times = {name: s["median"] for name, s in series.items()}
        ours = series["ours"]
        rows.append(summary_row(case, mode, x, times, units * x.nbytes / bandwidth * 1e3) | {
            "ours p90 ms": ours["p90"], "ours p90 churn ms": ours["churn p90"],
            "compile p90 ms": series["compile"]["p90"],
            "compile p90 churn ms": series["compile"]["churn p90"],
            "ours p90/median": ours["p90"] / ours["median"]})
    return rows


def summary_row(case: Case, mode: str, x: torch.Tensor, times: dict[str, float],
                floor_ms: float) -> dict:
    return {
        "device": case.device, "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
        "normalize": case.normalize, "mode": mode, "ours ms": times["ours"],
        "eager ms": times["eager"],
        "compile ms": times["compile"], "floor ms": floor_ms,
        "ours/eager": times["ours"] / times["eager"],
        "ours/compile": times["ours"] / times["compile"],
        "ours/floor": times["ours"] / floor_ms,
        "copy-BW fraction": floor_ms / times["ours"],
        "x MB": x.nbytes / 2**20,
    }


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
                f"CUDA {torch.version.cuda}; device time per call, each call on its own copy "
                f"of the input (copies of {CUDA_ROTATION_BYTES // 2**20} MB in all)")
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
                for normalize in NORMALIZATIONS:
                    rows.extend(run_case(Case(dev, shape, dtype, normalize), repeats))
    df = pd.DataFrame(rows)
    report = []
    for dev in devices:
        part = df[df.device == dev].dropna(axis="columns", how="all")
        how = (f"median of {repeats}" if dev == "cuda" else
               f"median and p90 of {repeats} calls, each series in a fresh process after 3 "
               f"warm-up calls; 'churn': other allocations (2 |x|) before each call")
        report += [f"{machine_line(dev)}; {how}", "", to_markdown(part), ""]
    text = "\n".join(report)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        title = f"# `python -m sparsity_ext bench`, {time.strftime('%Y-%m-%d')}"
        Path(out).write_text(f"{title}\n\n{text}")
    return df
