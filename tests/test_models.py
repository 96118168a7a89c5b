"""SparsityMonitor on real architectures: torchvision models, random init, small inputs, CPU.

For every hooked call we compute by hand which axis holds the channels (the features of a
Linear for ConvNeXt's channels-last GELU and ViT's token MLP, dim 1 otherwise) and check
that the monitor recorded exactly one record per call with N x that many rows, and none
for outputs with one position.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsity_ext.monitor import SparsityMonitor, SparsityPenalty

torchvision = pytest.importorskip("torchvision")
models = torchvision.models

BATCH = 2


def tiny_vit():
    return models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


# name: (constructor, input size, channels-last: the channels sit in the last dim)
MODELS = {
    "resnet18": (lambda: models.resnet18(num_classes=10), 64, False),
    "mobilenet_v3_small": (lambda: models.mobilenet_v3_small(num_classes=10), 64, False),
    "efficientnet_b0": (lambda: models.efficientnet_b0(num_classes=10), 64, False),
    "convnext_tiny": (lambda: models.convnext_tiny(num_classes=10), 64, True),
    "vit": (tiny_vit, 32, True),
}


def expected_calls(model, layers, x, channels_last):
    """[(layer, call index, channels)] of every hooked call with more than one position,
    and the names of layers called more than once, from our own hooks."""
    calls, counts = [], {}

    def hook(module, inputs, out, name):
        call = counts.get(name, 0)
        counts[name] = call + 1
        if isinstance(out, torch.Tensor) and out.dim() >= 3:
            channels = out.shape[-1] if channels_last else out.shape[1]
            if out.numel() // (out.shape[0] * channels) > 1:
                calls.append((name, call, channels))

    handles = [
        m.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
        for name, m in layers.items()
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return calls, {name for name, n in counts.items() if n > 1}


@pytest.mark.parametrize("name", list(MODELS))
def test_records_are_real_rows_one_per_call(name):
    make, size, channels_last = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(BATCH, 3, size, size)
    monitor = SparsityMonitor(model)
    penalty = SparsityPenalty(monitor, 0.1)
    calls, multi = expected_calls(model, monitor.layers, x, channels_last)
    monitor.reset()
    (model(x).sum() + penalty()).backward()
    records = monitor.end_epoch(0)

    def record_name(layer, call):
        return f"{layer}#{call}" if layer in multi else layer

    expected = [(record_name(n, c), BATCH * channels) for n, c, channels in calls]
    assert sorted((r.layer, r.rows) for r in records) == sorted(expected)
    assert penalty.layers == [r.layer for r in records]
    for r in records:  # no constant-zero records from one-position outputs
        assert 0 < r.entropy and 0 < r.sparsity < 1 and 0 <= r.zero_fraction <= 1, r
    if name == "resnet18":  # the stem relu, then each block's relu twice (branch, after add)
        assert len(records) == 1 + 8 * 2 and "layer1.1.relu#1" in {r.layer for r in records}
    if name == "efficientnet_b0":  # squeeze-excitation outputs (N, C, 1, 1) are skipped
        assert len(records) < len(monitor.layers)

    # A deepcopy (a teacher, an EMA model) measures into its own monitor, never this one.
    teacher = copy.deepcopy(model)
    model(x)
    teacher(torch.randn(BATCH + 1, 3, size, size))
    assert sorted((r.layer, r.rows) for r in monitor.end_epoch(1)) == sorted(expected)
    monitor.remove()


def test_a_compiled_monitored_resnet18_compiles_once_and_records():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).eval()
    compiled = torch.compile(model, backend="eager")  # the graph count is Dynamo's matter
    monitor = SparsityMonitor(compiled)
    assert monitor.model is model
    x = torch.randn(BATCH, 3, 64, 64)
    counters.clear()
    with torch.no_grad():
        for _ in range(5):
            compiled(x)
    # The first step traces; the second traces once more because its buffers exist now.
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    records = monitor.end_epoch(0)
    assert len(records) == 17 and all(r.rows % (5 * BATCH) == 0 for r in records)
    monitor.remove()
    torch._dynamo.reset()
