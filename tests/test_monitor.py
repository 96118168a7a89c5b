"""SparsityMonitor and SparsityPenalty: hooks, recorded values, gradients, effect on training."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsity_ext
from sparsity_ext import monitor as monitor_module
from sparsity_ext import ops, reference
from sparsity_ext.monitor import SparsityMonitor, SparsityPenalty, default_layers
from sparsity_ext.app.data import load_digits
from sparsity_ext.app.models import SmallResNet, SmallVGG


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def collect_activations(model: nn.Module, names: list[str]):
    """Our own hooks: every output of the named modules, in call order, per name."""
    seen = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: seen[name].append(out.detach().clone())
        )
        for name in names
    ]
    return seen, handles


class FunctionalNet(nn.Module):
    """Activations as function calls: the default rule falls back to the conv modules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv1d(4, 5, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.conv2(y.flatten(2))


@pytest.mark.parametrize("model_cls", [SmallVGG, SmallResNet])
def test_hooks_attach_detach_and_leave_outputs_unchanged(model_cls):
    model = model_cls(3, 10, 16)
    twin = copy.deepcopy(model)  # never monitored; BatchNorm statistics evolve identically
    x = torch.randn(5, 3, 16, 16)
    before = hook_counts(model)

    def same_outputs() -> bool:
        results = []
        for mode in (True, False):
            model.train(mode), twin.train(mode)
            results.append(torch.equal(model(x), twin(x)))
        return all(results)

    with SparsityMonitor(model) as monitor:
        assert hook_counts(model) != before
        assert same_outputs()
        penalty = SparsityPenalty(monitor, 0.5)
        assert same_outputs()
        model.train(), twin.train()
        model(x)
        twin(x)
        assert penalty().requires_grad
    assert hook_counts(model) == before
    monitor.remove()  # a second remove is harmless
    assert same_outputs()


def test_default_layers_rule():
    vgg = SmallVGG(1, 10, 8)
    layers = default_layers(vgg)
    assert list(layers) == [
        "features.stage1_relu1",
        "features.stage1_relu2",
        "features.stage2_relu1",
        "features.stage2_relu2",
        "classifier.fc1_relu",
    ]
    with SparsityMonitor(vgg) as monitor:
        vgg(torch.randn(4, 1, 8, 8))
        records = monitor.end_epoch(0)
    # The fully connected activation (N, 128) has no spatial dim: hooked, never recorded.
    assert [r.layer for r in records] == list(layers)[:-1]
    assert list(default_layers(FunctionalNet())) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="no layers to monitor"):
        SparsityMonitor(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        SparsityMonitor(vgg, layers=["nope"])
    with pytest.raises(ValueError, match="submodules of the model"):
        SparsityMonitor(vgg, layers=[nn.ReLU()])
    chosen = SparsityMonitor(vgg, layers=[vgg.features.stage1_conv1, "features.stage2_relu2"])
    assert list(chosen.layers) == ["features.stage1_conv1", "features.stage2_relu2"]
    chosen.remove()


@pytest.mark.parametrize("model_cls", [SmallVGG, SmallResNet])
def test_monitored_values_equal_the_op_applied_by_hand(model_cls):
    model = model_cls(2, 10, 8)
    monitor = SparsityMonitor(model)
    names = [name for name in monitor.layers if "fc" not in name]
    seen, handles = collect_activations(model, names)
    batches = {
        "train": [torch.randn(n, 2, 8, 8) * 3 for n in (7, 1, 4)],
        "test": [torch.randn(n, 2, 8, 8) for n in (3, 6)],
    }
    for split, xs in batches.items():
        model.train(split == "train")
        with torch.set_grad_enabled(split == "train"):
            for x in xs:
                model(x)
    records = monitor.end_epoch(3)
    monitor.remove()
    for h in handles:
        h.remove()
    by_key = {(r.split, r.layer): r for r in records}
    assert set(by_key) == {(s, n) for s in batches for n in names}
    for split, xs in batches.items():
        calls = sum(len(x) for x in xs)
        for name in names:
            outputs = seen[name][: len(xs)] if split == "train" else seen[name][-len(xs) :]
            stats = [ops.channel_stats(a) for a in outputs]
            sparsity = torch.cat([s.sparsity.flatten() for s in stats]).double()
            entropy = torch.cat([s.entropy.flatten() for s in stats]).double()
            ref = torch.cat([reference.sparsity(a).flatten() for a in outputs]).double()
            record = by_key[(split, name)]
            assert record.epoch == 3
            assert record.rows == sparsity.numel() == calls * outputs[0].shape[1]
            assert record.sparsity == pytest.approx(
                sparsity.mean().item(), rel=1e-6, abs=1e-9
            )  # float32 per-batch sums
            assert record.entropy == pytest.approx(
                entropy.mean().item(), rel=1e-6, abs=1e-9
            )  # float32 per-batch sums
            assert record.sparsity == pytest.approx(ref.mean().item(), rel=1e-5, abs=1e-6)
    assert monitor.history == records
    assert monitor.end_epoch(4) == []  # accumulators were reset


def test_explicit_split_disabled_monitor_and_capture():
    model = SmallVGG(1, 10, 8).eval()
    x = torch.randn(6, 1, 8, 8)
    monitor = SparsityMonitor(model)
    monitor.split = "val"
    model(x)
    monitor.enabled = False
    model(x)  # not recorded
    monitor.enabled = True
    with monitor.capture() as maps:
        model(x[:2])  # not recorded either
    records = monitor.end_epoch(0)
    assert {r.split for r in records} == {"val"}
    assert set(maps) == {r.layer for r in records}
    assert all(r.rows == 6 * maps[r.layer].shape[1] for r in records)
    act = model.features.stage1_relu1(model.features.stage1_conv1(x[:2]))
    torch.testing.assert_close(maps["features.stage1_relu1"], ops.sparsity(act).float())
    monitor.remove()


@pytest.mark.parametrize("normalize", ["softmax", "l1"])
def test_penalty_gradient_matches_autograd_of_the_reference(normalize):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(4 * 9, 3),
    ).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = float(torch.rand(()) * 2 + 0.1)
    penalty = SparsityPenalty(model, weight, normalize=normalize)
    assert list(penalty.monitor.layers) == ["1", "3"]
    model(x)
    value = penalty()
    grads = torch.autograd.grad(value, [x, *model.parameters()], allow_unused=True)

    a1 = model[1](model[0](x))
    a2 = model[3](model[2](a1))
    expected = weight * (reference.sparsity(a1, normalize).mean()
                         + reference.sparsity(a2, normalize).mean()) / 2
    expected_grads = torch.autograd.grad(expected, [x, *model.parameters()], allow_unused=True)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    penalty.monitor.remove()


def test_penalty_runs_the_graph_op_once_per_layer_and_the_monitor_one_native_call(monkeypatch):
    torch.manual_seed(0)
    model = SmallVGG(1, 10, 8)
    x = torch.randn(4, 1, 8, 8)
    graph_calls, sums_calls = [], []
    ops = sparsity_ext.ops
    real_graph, real_sums = ops.channel_stats, ops.monitor_sums_
    monkeypatch.setattr(ops, "channel_stats", lambda *a, **k: graph_calls.append(1) or real_graph(*a, **k))
    monkeypatch.setattr(ops, "monitor_sums_", lambda *a: sums_calls.append(1) or real_sums(*a))
    plain = SparsityMonitor(model)
    model(x)
    expected = plain.end_epoch(0)
    plain.remove()
    assert (graph_calls, sums_calls) == ([], [1] * 4)
    sums_calls.clear()
    penalty = SparsityPenalty(model, 1.0)
    model(x)
    assert (graph_calls, sums_calls) == ([1] * 4, [1] * 4)  # with grad, once per conv activation
    value = penalty()
    got = penalty.monitor.end_epoch(0)
    for g, e in zip(got, expected):
        for field in ("sparsity", "entropy", "sparsity_l1", "zero_fraction", "mean_activation"):
            assert getattr(g, field) == pytest.approx(getattr(e, field), rel=1e-6), field
    assert value.item() == pytest.approx(sum(r.sparsity for r in got) / 4, rel=1e-5)
    assert penalty.layers == [r.layer for r in got]
    model(x)  # a new forward pass replaces the previous pass's values
    assert penalty().item() == pytest.approx(value.item(), rel=1e-6)
    penalty.monitor.remove()


def test_penalty_is_zero_without_grad_and_rejects_negative_weights():
    model = SmallVGG(1, 10, 8)
    penalty = SparsityPenalty(model, 2.0)
    with torch.no_grad():
        model(torch.randn(3, 1, 8, 8))
    assert penalty().item() == 0.0 and not penalty().requires_grad
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="penalty weight must be a number >= 0"):
            SparsityPenalty(penalty.monitor, bad)
    penalty.monitor.remove()


def test_the_public_exports():
    assert sparsity_ext.SparsityMonitor is SparsityMonitor
    assert sparsity_ext.SparsityPenalty is SparsityPenalty
    assert callable(sparsity_ext.overfitting_warning)


def test_a_gradient_step_on_the_penalty_lowers_it():
    """Deterministic: a small enough step against the penalty's gradient lowers the
    penalty on the same batch (a zero, None or sign-flipped gradient fails)."""
    torch.manual_seed(0)
    data = load_digits(None, 64, 32, 0)
    for normalize in ("softmax", "l1"):
        torch.manual_seed(0)
        model = SmallVGG(1, 10, 8)
        penalty = SparsityPenalty(model, 1.0, normalize=normalize)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        model(data.train_x)
        before = penalty()
        optimizer.zero_grad()
        before.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert sum(g.abs().sum() for g in grads) > 0, normalize
        optimizer.step()
        model(data.train_x)
        assert penalty().item() < before.item(), normalize
        penalty.monitor.remove()


def hand_columns(outputs: list[torch.Tensor]) -> dict[str, float]:
    """Every record column from the activations, by the textbook formulas in float64."""
    rows = torch.cat([a.detach().double().flatten(2).flatten(0, 1) for a in outputs])
    length = rows.shape[1]
    p = torch.softmax(rows, dim=1)
    entropy = torch.special.entr(p).sum(1)
    a = rows.clamp_min(0)
    total = a.sum(1)
    live = total > 0
    q = a[live] / total[live, None]
    entropy_l1 = torch.special.entr(q).sum(1)
    return {
        "sparsity": ((length - entropy.exp()) / (length - 1)).mean().item(),
        "entropy": entropy.mean().item(),
        "sparsity_l1": ((length - entropy_l1.exp()) / (length - 1)).mean().item(),
        "entropy_l1": entropy_l1.mean().item(),
        "zero_fraction": (rows <= 0).double().mean().item(),
        "dead_fraction": 1 - live.double().mean().item(),
        "mean_activation": rows.mean().item(),
        "rows": rows.shape[0],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_column_equals_a_float64_hand_formula(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3), nn.ELU())
    with torch.no_grad():
        model[0].bias[0] = -100.0  # channel 0 of the ReLU is dead in every sample
    model.to(dtype)
    monitor = SparsityMonitor(model)
    seen, handles = collect_activations(model, ["1", "3"])
    for n in (3, 1, 4):
        model(torch.randn(n, 2, 7, 6, dtype=dtype) * 2)
    records = {r.layer: r for r in monitor.end_epoch(0)}
    monitor.remove()
    for h in handles:
        h.remove()
    assert set(records) == {"1", "3"}
    assert records["1"].dead_fraction == pytest.approx(1 / 5, abs=1e-12)
    # Per-row values are float32 before they are averaged, also for 16-bit activations:
    # averaging values rounded to bfloat16 would be off by ~1e-3, far outside these bounds.
    rel = 1e-12 if dtype == torch.float64 else 2e-6
    for name, record in records.items():
        expected = hand_columns(seen[name])
        assert record.rows == expected.pop("rows")
        for field, value in expected.items():
            assert getattr(record, field) == pytest.approx(value, rel=rel, abs=rel), (name, field)


def test_the_l1_op_the_monitor_reads_keeps_its_contract_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    x[0, 1] = -x[0, 1].abs()  # a dead row
    x[1, 2, 0, 0] = 0.0  # an exact zero on a live row
    x.requires_grad_(True)
    entropy, perplexity, sparsity, row_stats = torch.ops.sparsity_ext.l1_stats_forward(x)
    assert row_stats.shape == (4, 3, 4) and row_stats.dtype == torch.float64
    rows = x.detach().flatten(2)
    a = rows.clamp_min(0)
    torch.testing.assert_close(row_stats[0], a.sum(-1))
    torch.testing.assert_close(row_stats[2], (rows <= 0).sum(-1).double())
    torch.testing.assert_close(row_stats[3], rows.sum(-1))
    assert entropy[0, 1].item() == pytest.approx(math.log(30)) and sparsity[0, 1].item() == 0
    torch.testing.assert_close(perplexity, entropy.exp())
    # Gradient: -(log a_i - T/S) / S where x_i > 0, exactly 0 elsewhere (ReLU convention).
    (grad,) = torch.autograd.grad(entropy.sum(), x)
    s, t_over_s = row_stats[0, ..., None], row_stats[1, ..., None]
    live = (a > 0) & (s > 0)
    expected = torch.where(live, -(a.clamp_min(1e-300).log() - t_over_s) / s, 0.0)
    torch.testing.assert_close(grad.flatten(2), expected)
    assert grad.isfinite().all() and (grad.flatten(2)[~live] == 0).all()
    # Scale invariance of the L1 measure; float32 row_stats for 16-bit input.
    scaled = torch.ops.sparsity_ext.l1_stats_forward(x.detach() * 7.5)[2]
    torch.testing.assert_close(scaled, sparsity.detach())
    assert torch.ops.sparsity_ext.l1_stats_forward(x.detach().half())[3].dtype == torch.float32


class TwiceCalled(nn.Module):
    """One ReLU module called on two maps of different widths, like torchvision's blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_one_record_per_call_and_capture_keeps_every_call():
    torch.manual_seed(0)
    model = TwiceCalled()
    monitor = SparsityMonitor(model)
    seen, handles = collect_activations(model, ["relu"])
    x = torch.randn(4, 2, 5, 5)
    model(x)
    model(x[:3])
    records = {r.layer: r for r in monitor.end_epoch(0)}
    assert list(records) == ["relu#0", "relu#1"]
    assert [records["relu#0"].rows, records["relu#1"].rows] == [7 * 3, 7 * 6]
    for call in (0, 1):
        expected = hand_columns(seen["relu"][call::2])
        assert records[f"relu#{call}"].sparsity == pytest.approx(expected["sparsity"], abs=1e-6)
    with torch.no_grad(), monitor.capture() as maps:
        model(x)
    assert list(maps) == ["relu#0", "relu#1"]
    assert [m.shape for m in maps.values()] == [(4, 3), (4, 6)]
    torch.testing.assert_close(maps["relu#1"], ops.sparsity(seen["relu"][-1]).float())
    assert monitor.end_epoch(1) == []  # captured passes are not accumulated
    monitor.remove()
    for h in handles:
        h.remove()


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's pattern: a Linear over the last dim of (N, H, W, C), then a GELU."""

    def __init__(self, dim=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        return x + self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)


class TokenMLP(nn.Module):
    """A transformer MLP on (N, T, D) tokens, plus a bare 3-D activation without a Linear."""

    def __init__(self, dim=6):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.bare = nn.Tanh()

    def forward(self, x):
        return self.bare(self.mlp(x))


def test_axes_rule_channels_last_tokens_and_ambiguous_outputs():
    torch.manual_seed(0)
    block = ChannelsLastBlock()
    seen, handles = collect_activations(block, ["act"])
    with SparsityMonitor(block) as monitor:
        block(torch.randn(3, 4, 5, 7))
        (record,) = monitor.end_epoch(0)
    assert record.layer == "act" and record.rows == 3 * 16  # (sample, feature), not (N, H)
    channels_first = seen["act"][0].permute(0, 3, 1, 2)  # (N, 4C, H, W)
    assert record.sparsity == pytest.approx(hand_columns([channels_first])["sparsity"], abs=1e-6)

    tokens = TokenMLP()
    seen, _ = collect_activations(tokens, ["mlp.1", "bare"])
    with SparsityMonitor(tokens) as monitor:
        with pytest.warns(UserWarning, match=r"'bare' gives a 3-D output .* channel_dim="):
            tokens(torch.randn(2, 9, 6))
        tokens(torch.randn(2, 9, 6))  # warned once only (pytest fails on a second warning)
        (record,) = monitor.end_epoch(0)
    assert record.layer == "mlp.1" and record.rows == 2 * 2 * 12  # features x 2 batches
    expected = hand_columns([a.transpose(1, 2) for a in seen["mlp.1"]])
    assert record.entropy == pytest.approx(expected["entropy"], rel=1e-6)
    assert record.sparsity_l1 == pytest.approx(expected["sparsity_l1"], rel=1e-6)

    # An explicit channel_dim overrides the rule, per layer.
    with SparsityMonitor(tokens, channel_dim={"bare": 1}) as monitor:
        x = torch.randn(2, 9, 6)
        tokens(x)
        records = {r.layer: r for r in monitor.end_epoch(0)}
    assert records["bare"].rows == 2 * 9 and records["mlp.1"].rows == 2 * 12
    with pytest.raises(ValueError, match="not monitored"):
        SparsityMonitor(tokens, channel_dim={"nope": 1})
    for bad in (0, 1.0):
        with pytest.raises(ValueError, match="non-batch dim"):
            SparsityMonitor(tokens, channel_dim=bad)


def test_one_position_outputs_are_skipped_and_the_penalty_averages_over_layers_with_rows():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),  # (N, 4, 6, 6): measured
        nn.AdaptiveAvgPool2d(1),
        nn.Sigmoid(),  # (N, 4, 1, 1): one position, skipped
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.Tanh(),  # (N, 3): skipped
    )
    penalty = SparsityPenalty(model, 1.0)
    x = torch.randn(5, 2, 6, 6)
    model(x)
    value = penalty()
    assert penalty.layers == ["1"]
    a = model[1](model[0](x))  # a submodule called alone: its call count starts at 0
    torch.testing.assert_close(value, reference.sparsity(a).mean())  # not diluted by zeros
    assert [r.layer for r in penalty.monitor.end_epoch(0)] == ["1"]
    penalty.monitor.remove()


def test_requested_layers_without_rows_are_named_in_a_warning():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2), nn.ReLU())
    monitor = SparsityMonitor(model, layers=["1", "4"])
    model(torch.randn(2, 1, 4, 4))
    with pytest.warns(UserWarning, match=r"gave no rows this epoch \(4: 2-D output \(2, 2\)"):
        assert [r.layer for r in monitor.end_epoch(0)] == ["1"]
    monitor.remove()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_is_not_counted(use_reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3))
    x = torch.randn(4, 2, 6, 6, requires_grad=True)
    records = []
    for checkpointed in (False, True):
        with SparsityMonitor(model) as monitor:
            if checkpointed:
                out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
            else:
                out = model(x)
            out.sum().backward()
            records.append(monitor.end_epoch(0))
    assert records[0] == records[1] and records[0][0].rows == 4 * 3


def test_a_deepcopy_has_its_own_monitor_and_a_monitored_model_pickles(tmp_path):
    torch.manual_seed(0)
    student = SmallVGG(1, 10, 8)
    monitor = SparsityMonitor(student)
    penalty = SparsityPenalty(monitor, 0.5)
    x = torch.randn(4, 1, 8, 8)
    student(x)
    value = penalty()
    teacher = copy.deepcopy(student)  # e.g. an EMA / teacher copy, taken mid-training
    teacher(torch.randn(6, 1, 8, 8) * 5)  # must not touch the student's monitor
    assert penalty().item() == value.item() and penalty.layers
    records = monitor.end_epoch(0)
    assert {r.rows for r in records} <= {4 * 32, 4 * 64}
    torch.save(student, tmp_path / "student.pt")
    loaded = torch.load(tmp_path / "student.pt", weights_only=False)
    loaded(x)  # the loaded copy measures into its own monitor copy
    assert monitor.end_epoch(1) == []
    reloaded_monitor = next(iter(loaded.features.stage1_relu1._forward_hooks.values())).monitor
    assert reloaded_monitor is not monitor
    assert [r.sparsity for r in reloaded_monitor.end_epoch(0)] == pytest.approx(
        [r.sparsity for r in records], rel=1e-6
    )
    clone = pickle.loads(pickle.dumps(monitor))  # a monitor pickles on its own as well
    assert clone.history == monitor.history and clone.layers.keys() == monitor.layers.keys()
    monitor.remove()
    assert hook_counts(copy.deepcopy(student)) == hook_counts(SmallVGG(1, 10, 8))


def test_a_compiled_monitored_model_does_not_recompile_per_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SmallResNet(1, 10, 8)
    model = copy.deepcopy(eager)
    expected_monitor = SparsityMonitor(eager)
    compiled = torch.compile(model, backend="aot_eager")
    monitor = SparsityMonitor(compiled)  # unwraps the OptimizedModule
    assert monitor.model is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(4, 1, 8, 8)
    from torch._dynamo.utils import counters

    counters.clear()
    for _ in range(5):
        compiled(x).sum().backward()
        optimizer.step()
        eager(x)
    # The first step traces, the second once more (its buffers exist now), then no more.
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    got, expected = monitor.end_epoch(0), expected_monitor.end_epoch(0)
    assert [(r.layer, r.rows) for r in got] == [(r.layer, r.rows) for r in expected]
    assert [r.sparsity for r in got] == pytest.approx([r.sparsity for r in expected], rel=1e-5)
    torch._dynamo.reset()
