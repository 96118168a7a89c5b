"""The benchmark's CUDA timing logic, run on the CPU against a stand-in for torch.cuda:
which calls it makes, when it falls back from graph replay, and how many input copies it
rotates through. (The timings themselves are only ever produced on a GPU.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sparsity_ext.app import benchmark


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Clock:
    """Device time that advances only when a stand-in kernel runs: timings are exact."""
    now_ms = 0.0


class _Event:
    def __init__(self, enable_timing: bool = False):
        self.at = None

    def record(self) -> None:
        self.at = _Clock.now_ms

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _Event) -> float:
        return end.at - self.at


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream, event and graph API on the host: a graph records the calls
    made while it captures and replays them; `state["refuse"]` makes capture fail."""
    state = {"refuse": False, "capturing": None}

    class Graph:
        def __init__(self):
            self.calls = []

        def replay(self):
            for call in self.calls:
                call()

    @contextlib.contextmanager
    def graph(g):
        if state["refuse"]:
            raise RuntimeError("operation not permitted when stream is capturing")
        state["capturing"] = g
        try:
            yield
        finally:
            state["capturing"] = None

    for name, value in {
        "Stream": _Stream, "stream": lambda s: contextlib.nullcontext(),
        "current_stream": _Stream, "synchronize": lambda *a: None, "Event": _Event,
        "CUDAGraph": Graph, "graph": graph,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return state


@pytest.mark.parametrize("refuse", [False, True], ids=["graph", "capture refused"])
def test_time_cuda_ms_replays_one_pass_per_sample(fake_cuda, refuse):
    fake_cuda["refuse"] = refuse
    made = []

    def make_call(i):
        def call():
            made.append(i)
            if fake_cuda["capturing"] is not None:
                fake_cuda["capturing"].calls.append(call)
            _Clock.now_ms += 5.0 + i  # kernel i takes 5 + i ms
        return call

    calls = [make_call(i) for i in range(3)]
    ms, how = benchmark.time_cuda_ms(calls, repeats=4, warmup=2)
    assert how == ("stream" if refuse else "graph")
    # warm-up passes, the captured pass (none if refused), one untimed pass, the timed ones
    passes = 2 + (0 if refuse else 1) + 1 + 4
    assert made == [0, 1, 2] * passes
    assert ms == 6.0  # per call (5, 6 and 7 ms: mean 6), not per pass of 3 calls (18 ms)


def test_rotation_holds_enough_bytes_in_separate_copies():
    x = torch.randn(16, 8, 32, 32, requires_grad=True)  # 512 KiB
    copies = benchmark.rotation(x)
    assert len(copies) == benchmark.MAX_ROTATION_COPIES
    assert len({t.data_ptr() for t in copies}) == len(copies)
    assert all(torch.equal(t, x) and t.requires_grad and t.is_leaf for t in copies)
    quarter = torch.empty(benchmark.CUDA_ROTATION_BYTES // 4, dtype=torch.uint8)
    assert len(benchmark.rotation(quarter)) == 4
    assert len(benchmark.rotation(quarter[1:])) == 5  # one byte short of a quarter
    assert len(benchmark.rotation(torch.empty(benchmark.CUDA_ROTATION_BYTES + 1,
                                              dtype=torch.uint8))) == 1


def test_percentile_interpolates_between_order_statistics():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert benchmark.percentile(samples, 50) == 3.0
    assert benchmark.percentile(samples, 90) == pytest.approx(4.6)
    assert benchmark.percentile(samples, 100) == 5.0 and benchmark.percentile(samples, 0) == 1.0


def test_cpu_timing_runs_between_untimed_and_times_each_call(monkeypatch):
    clock = {"now": 0.0}
    calls = []
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])

    def fn(x):
        calls.append("fn")
        clock["now"] += 0.002 * len([c for c in calls if c == "fn"])  # 2, 4, 6 ... ms

    def between():
        calls.append("between")
        clock["now"] += 1.0  # untimed

    samples = benchmark.time_samples(fn, None, repeats=3, warmup=2, between=between)
    assert calls == ["fn", "fn"] + ["between", "fn"] * 3
    assert samples == pytest.approx([6.0, 8.0, 10.0])


def test_churn_allocates_twice_the_bytes_in_many_sizes(monkeypatch):
    sizes = []
    real_ones = torch.ones
    monkeypatch.setattr(benchmark.torch, "ones", lambda n: sizes.append(n * 4) or real_ones(n))
    benchmark.churn(2**25)
    assert sum(sizes) >= 2 * 2**25 and sum(sizes[:-1]) < 2 * 2**25
    assert set(sizes) == {2**12, 2**16, 2**20, 2**24, 2**25}


def test_interleaved_timing_rotates_the_order_and_keeps_each_series_apart(monkeypatch):
    clock = {"now": 0.0}
    calls = []
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])

    def make(name, ms):
        def fn(x):
            calls.append(name)
            clock["now"] += ms / 1e3
        return fn

    samples = benchmark.time_interleaved({"a": make("a", 1), "b": make("b", 2), "c": make("c", 3)},
                                         None, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert samples == {"a": pytest.approx([1.0] * 3), "b": pytest.approx([2.0] * 3),
                       "c": pytest.approx([3.0] * 3)}


def test_cpu_rows_pool_the_calls_of_every_process(monkeypatch):
    """Medians and p90s over the calls of all processes; the ratio's spread is the least and
    the greatest of one process's median ours over its median compile."""
    runs = iter([
        {"ours": {"calls": [1.0, 2.0, 3.0], "churn": [3.0, 3.0, 3.0]},
         "compile": {"calls": [4.0, 4.0, 4.0], "churn": [5.0, 5.0, 5.0]},
         "copy": {"calls": [0.5, 0.5, 0.5]}, "eager": {"calls": [9.0, 9.0, 9.0]}},
        {"ours": {"calls": [4.0, 5.0, 6.0], "churn": [6.0, 6.0, 6.0]},
         "compile": {"calls": [8.0, 8.0, 8.0], "churn": [11.0, 11.0, 11.0]},
         "copy": {"calls": [1.5, 1.5, 1.5]}, "eager": {"calls": [20.0, 20.0, 20.0]}},
    ] * len(benchmark.MODES))
    monkeypatch.setattr(benchmark, "fresh_process_series", lambda case, mode, repeats: next(runs))
    x = torch.empty(2, 3, 4)
    rows = benchmark.cpu_rows(benchmark.Case("cpu", (2, 3, 4), "float32"), x, 3, processes=2)
    assert [row["mode"] for row in rows] == list(benchmark.MODES)
    forward = rows[0]
    assert forward["ours ms"] == 3.5 and forward["compile ms"] == 6.0  # medians of 6 calls
    assert forward["eager ms"] == 14.5
    assert forward["ours p90 ms"] == pytest.approx(5.5)  # 5 + 0.5 (6 - 5), between order stats
    assert forward["ours p90 churn ms"] == 6.0 and forward["compile p90 churn ms"] == 11.0
    assert forward["ours p90 churn/median"] == 6.0 / 3.5
    assert forward["compile p90/median"] == pytest.approx(8.0 / 6.0)
    assert forward["copy p90/median"] == pytest.approx(1.5 / 1.0)
    assert forward["floor ms"] == pytest.approx(1.0 / 2)  # |x| at the pooled copy's 2 |x| / 1 ms
    assert forward["ours/compile by process"] == "0.5-0.625"  # 2 / 4 and 5 / 8
    assert rows[1]["floor ms"] == pytest.approx(3 * 1.0 / 2)


def test_cpu_rows_of_one_process_show_no_spread(monkeypatch):
    run = {"ours": {"calls": [1.0, 3.0], "churn": [3.0, 3.0]},
           "compile": {"calls": [4.0, 8.0], "churn": [5.0, 5.0]},
           "copy": {"calls": [1.0, 1.0]}, "eager": {"calls": [9.0, 9.0]}}
    monkeypatch.setattr(benchmark, "fresh_process_series", lambda case, mode, repeats: run)
    rows = benchmark.cpu_rows(benchmark.Case("cpu", (2, 3, 4), "float32"), torch.empty(2, 3, 4), 2)
    assert rows[0]["ours/compile"] == 2.0 / 6.0 and rows[0]["ours/compile by process"] is None
