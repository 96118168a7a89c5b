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

On the CPU each call is timed on its own, as a user sees it: every (case, mode) runs in a
fresh process (or several, ``--processes``, their calls pooled: one process's speed differs
from the next one's by tens of percent on a shared VM, torch.compile's more than ours), in
which ours, torch.compile and the copy are timed in turn, one call each
per round (:func:`time_interleaved`), so that all three see the same machine state: on a
shared VM the speed drifts by tens of percent over minutes, which made ratios of series
taken minutes apart unreliable. Medians and 90th percentiles are reported, and so is the
90th percentile when other allocations come between the calls (:func:`churn`), which is
when fresh memory costs page faults (see csrc/cpu/recycled_buffers.h). Eager PyTorch, much
slower, is timed after them in the same process.
"""

from __future__ import annotations

import functools
import json
import math
import platform
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


def time_interleaved(fns: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int = 3,
                     between: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Wall time in milliseconds (CPU) of ``repeats`` calls ``fn(x)`` of every fn, taken in
    rounds of one call each, the order rotated by one every round: all see the same machine
    state and none always runs right after the same other one. ``warmup`` untimed rounds
    come first (torch.compile compiles in its first); ``between`` runs untimed before each
    timed call."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name](x)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            if between is not None:
                between()
            begin = time.perf_counter()
            fns[name](x)
            samples[name].append((time.perf_counter() - begin) * 1e3)
    return samples


def time_samples(fn: Callable, x: torch.Tensor, repeats: int, warmup: int = 3,
                 between: Callable[[], object] | None = None) -> list[float]:
    """:func:`time_interleaved` of one function."""
    return time_interleaved({"fn": fn}, x, repeats, warmup, between)["fn"]


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


MODES = {"forward": 1, "forward+backward": 3}  # mode: bytes moved, in units of |x|


def cpu_series(case: Case, mode: str, repeats: int) -> dict[str, dict[str, list[float]]]:
    """The CPU timings of one (case, mode), in this process, in ms per call: ``repeats``
    calls of ours, torch.compile and the copy, interleaved (``"calls"``); ours and compile
    again with :func:`churn` before each call (``"churn"``); then eager. Meant to run in a
    fresh process (:func:`fresh_process_series`)."""
    x = make_input(case.shape, DTYPES[case.dtype], "cpu")
    impls = implementations(case.normalize)
    xr = x.detach().requires_grad_(mode != "forward")
    dst = torch.empty_like(x)
    fns = {name: impls[name] if mode == "forward" else forward_backward_fn(impls[name], xr)
           for name in ("ours", "compile", "eager")}
    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        samples = time_interleaved({"ours": fns["ours"], "compile": fns["compile"],
                                    "copy": lambda _: dst.copy_(x)}, xr, repeats)
        churned = time_interleaved({"ours": fns["ours"], "compile": fns["compile"]}, xr,
                                   repeats, warmup=0, between=lambda: churn(x.nbytes))
        samples["eager"] = time_samples(fns["eager"], xr, repeats)
    return {name: {"calls": series, **({"churn": churned[name]} if name in churned else {})}
            for name, series in samples.items()}


def fresh_process_series(case: Case, mode: str, repeats: int) -> dict:
    """:func:`cpu_series` in a new Python process."""
    code = ("import json, sys\n"
            "from sparsity_ext.app import benchmark as b\n"
            "case, mode, repeats = json.loads(sys.argv[1])\n"
            "print(json.dumps(b.cpu_series(b.Case(**case), mode, repeats)))\n")
    argument = json.dumps([{"device": case.device, "shape": list(case.shape), "dtype": case.dtype,
                            "normalize": case.normalize}, mode, repeats])
    child = subprocess.run([sys.executable, "-c", code, argument], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child failed on {case} {mode}:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_case(case: Case, repeats: int, processes: int = 1) -> list[dict]:
    x = make_input(case.shape, DTYPES[case.dtype], case.device)
    check_correct(x, case.normalize)
    if not x.is_cuda:
        return cpu_rows(case, x, repeats, processes)
    inputs = rotation(x)
    destinations = {id(t): torch.empty_like(t) for t in inputs}  # preallocated, one each
    copy_ms, _ = time_cuda_ms([functools.partial(destinations[id(t)].copy_, t) for t in inputs],
                              repeats)
    del inputs, destinations
    bandwidth = 2 * x.nbytes / (copy_ms * 1e-3)  # bytes per second
    impls = implementations(case.normalize)
    rows = []
    for mode, units in MODES.items():
        xr = x.detach().requires_grad_(mode != "forward")
        inputs = rotation(xr)
        times, hows, peak = {}, set(), None
        for name, impl in impls.items():
            fn = impl if mode == "forward" else forward_backward_fn(impl, xr)
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                times[name], how = time_cuda_ms([functools.partial(fn, t) for t in inputs],
                                                repeats)
                hows.add(how)
                if name == "ours":
                    peak = peak_extra_mb(fn, xr)
        del inputs
        floor_ms = units * x.nbytes / bandwidth * 1e3
        rows.append(summary_row(case, mode, x, times, floor_ms) | {
            "peak extra MB": peak, "timing": ", ".join(sorted(hows))})
    return rows


def pool(runs: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, list[float]]]:
    """The calls of several :func:`cpu_series`, series by series, as one."""
    return {name: {kind: [t for run in runs for t in run[name][kind]] for kind in series}
            for name, series in runs[0].items()}


def cpu_rows(case: Case, x: torch.Tensor, repeats: int, processes: int = 1) -> list[dict]:
    """The CPU rows of a case: each mode timed in ``processes`` fresh processes, one after
    the other, their calls pooled. A process's speed differs from the next one's by tens of
    percent on a shared VM (torch.compile's more than ours), so with several the median is
    steadier, and the spread of the ours/compile ratio over the processes is shown."""
    rows = []
    for mode, units in MODES.items():
        runs = [fresh_process_series(case, mode, repeats) for _ in range(processes)]
        calls = pool(runs)
        median = {name: statistics.median(series["calls"]) for name, series in calls.items()}
        p90 = {(name, kind): percentile(samples, 90)
               for name, series in calls.items() for kind, samples in series.items()}
        bandwidth = 2 * x.nbytes / (median["copy"] * 1e-3)  # bytes per second
        ratios = [statistics.median(run["ours"]["calls"])
                  / statistics.median(run["compile"]["calls"]) for run in runs]
        rows.append(summary_row(case, mode, x, median, units * x.nbytes / bandwidth * 1e3) | {
            "ours p90 ms": p90["ours", "calls"], "ours p90 churn ms": p90["ours", "churn"],
            "compile p90 ms": p90["compile", "calls"],
            "compile p90 churn ms": p90["compile", "churn"],
            "ours p90/median": p90["ours", "calls"] / median["ours"],
            "ours p90 churn/median": p90["ours", "churn"] / median["ours"],
            # Compile's and the copy's tails in the same rounds, for comparison: the copy
            # allocates nothing and runs a different time, so it is a reference point.
            "compile p90/median": p90["compile", "calls"] / median["compile"],
            "copy p90/median": p90["copy", "calls"] / median["copy"],
            "ours/compile by process": (f"{min(ratios):.3g}-{max(ratios):.3g}"
                                        if processes > 1 else None)})
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
    return (f"{cpu_model()} ({torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), which the figures depend on as much as
    on the instruction set: the same AVX-512 code runs at different relative speeds on
    Intel and AMD cores."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def main(device: str | None = None, dtypes: list[str] | None = None, repeats: int = 15,
         processes: int = 1, out: str | None = None) -> pd.DataFrame:
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtypes = dtypes or ["float32", "bfloat16"]
    rows = []
    for dev in devices:
        shapes = CUDA_SHAPES if dev == "cuda" else CPU_SHAPES
        for shape in shapes:
            for dtype in dtypes:
                for normalize in NORMALIZATIONS:
                    rows.extend(run_case(Case(dev, shape, dtype, normalize), repeats,
                                         processes))
    df = pd.DataFrame(rows)
    report = []
    for dev in devices:
        part = df[df.device == dev].dropna(axis="columns", how="all")
        where = ("a fresh process" if processes == 1 else
                 f"{processes} fresh processes (their calls pooled; 'by process': the least "
                 f"and the greatest ratio of one process's medians)")
        how = (f"median of {repeats}" if dev == "cuda" else
               f"median and p90 of {repeats} calls after 3 warm-up calls, each (case, mode) "
               f"in {where}, ours, torch.compile and the copy timed in turn call by "
               f"call, eager after them; 'churn': other allocations (2 |x|) before each call; "
               f"'p90/median': a series' p90 over its median without churn (over the plain "
               f"median with it); compile's and the copy's, in the same rounds, for comparison")
        report += [f"{machine_line(dev)}; {how}", "", to_markdown(part), ""]
    text = "\n".join(report)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        title = f"# `python -m sparsity_ext bench`, {time.strftime('%Y-%m-%d')}"
        Path(out).write_text(f"{title}\n\n{text}")
    return df
