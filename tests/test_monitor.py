"""SparsityMonitor and SparsityPenalty: hooks, recorded values, gradients, effect on training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsity_ext
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
    model = SmallVGG(1, 10, 8)
    x = torch.randn(4, 1, 8, 8)
    calls = []
    real = ops.channel_stats
    monkeypatch.setattr(
        ops, "channel_stats", lambda a: calls.append(torch.is_grad_enabled()) or real(a)
    )
    plain = SparsityMonitor(model)
    model(x)
    expected = plain.end_epoch(0)
    plain.remove()
    assert calls == [False] * 4
    calls.clear()
    penalty = SparsityPenalty(model, 1.0)
    model(x)
    assert calls == [True] * 4  # with grad, once per conv activation, no second no-grad pass
    value = penalty()
    got = penalty.monitor.end_epoch(0)
    assert [r.sparsity for r in got] == pytest.approx([r.sparsity for r in expected], rel=1e-6)
    assert value.item() == pytest.approx(sum(r.sparsity for r in got) / 4, rel=1e-5)
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


def _train_digits(penalty_weight: float, seed: int, epochs: int = 4) -> float:
    """Short digits run; returns the final mean test sparsity over the conv layers."""
    data = load_digits(None, 200, 300, seed)
    torch.manual_seed(seed)
    model = SmallVGG(1, 10, 8)
    monitor = SparsityMonitor(model)
    penalty = SparsityPenalty(monitor, penalty_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(data.train_y), generator=generator).split(32):
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]) + penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            model(data.test_x)
        records = monitor.end_epoch(epoch)
    monitor.remove()
    test = [r.sparsity for r in records if r.split == "test"]
    return sum(test) / len(test)


def test_training_with_the_penalty_ends_with_lower_sparsity():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    without = _train_digits(0.0, seed)
    with_penalty = _train_digits(2.0, seed)
    assert with_penalty < 0.75 * without, (seed, with_penalty, without)
