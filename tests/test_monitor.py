"""SparsityMonitor and SparsityPenalty: hooks, recorded values, gradients, effect on training."""

from __future__ import annotations

import copy
import math

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


def test_penalty_gradient_matches_autograd_of_the_reference():
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
    penalty = SparsityPenalty(model, weight)
    assert list(penalty.monitor.layers) == ["1", "3"]
    model(x)
    value = penalty()
    grads = torch.autograd.grad(value, [x, *model.parameters()], allow_unused=True)

    a1 = model[1](model[0](x))
    a2 = model[3](model[2](a1))
    expected = weight * (reference.sparsity(a1).mean() + reference.sparsity(a2).mean()) / 2
    expected_grads = torch.autograd.grad(expected, [x, *model.parameters()], allow_unused=True)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    penalty.monitor.remove()


def test_penalty_runs_the_op_once_per_layer_and_the_monitor_reuses_it(monkeypatch):
    torch.manual_seed(0)
    model = SmallVGG(1, 10, 8)
    x = torch.randn(4, 1, 8, 8)
    graph_calls, plain_calls = [], []
    real_graph, real_plain = ops.channel_stats, monitor_module._softmax_rows
    monkeypatch.setattr(ops, "channel_stats", lambda a: graph_calls.append(1) or real_graph(a))
    monkeypatch.setattr(
        monitor_module, "_softmax_rows", lambda a: plain_calls.append(1) or real_plain(a)
    )
    plain = SparsityMonitor(model)
    model(x)
    expected = plain.end_epoch(0)
    plain.remove()
    assert (graph_calls, plain_calls) == ([], [1] * 4)
    plain_calls.clear()
    penalty = SparsityPenalty(model, 1.0)
    model(x)
    assert (graph_calls, plain_calls) == ([1] * 4, [])  # with grad, once per conv activation
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


def test_the_l1_stand_in_keeps_the_native_contract_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    x[0, 1] = -x[0, 1].abs()  # a dead row
    x[1, 2, 0, 0] = 0.0  # an exact zero on a live row
    x.requires_grad_(True)
    entropy, perplexity, sparsity, row_stats = monitor_module.l1_stats_forward(x)
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
    torch.testing.assert_close(monitor_module.l1_stats_forward(x.detach() * 7.5)[2], sparsity.detach())
    assert monitor_module.l1_stats_forward(x.detach().half())[3].dtype == torch.float32
