"""The suite's fixed seeds (conftest.py): each test starts from its own, repeatable seed."""

import random

import numpy as np
import torch
from conftest import seed_for


def test_a_test_starts_from_the_seed_of_its_node_id(request):
    seed = seed_for(request.node.nodeid)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    assert np.random.random() == np.random.RandomState(seed).random_sample()
    assert random.random() == random.Random(seed).random()
    assert ("seed", seed) in request.node.user_properties


def test_seeds_differ_between_tests_and_the_environment_overrides_them(monkeypatch):
    monkeypatch.delenv("SPARSITY_EXT_SEED", raising=False)
    a, b = seed_for("tests/test_x.py::test_a"), seed_for("tests/test_x.py::test_b")
    assert a != b and a == seed_for("tests/test_x.py::test_a")
    monkeypatch.setenv("SPARSITY_EXT_SEED", "17")
    assert seed_for("tests/test_x.py::test_a") == seed_for("tests/test_x.py::test_b") == 17
