"""Test-suite setup: fixed random seeds, the `cuda` marker's skip, failure reports that say
how to replay.

Every test starts from a seed derived from its node id (``tests/test_x.py::test_y[case]``),
so a run repeats exactly and a failure replays alone; ``SPARSITY_EXT_SEED=N`` runs every
test with seed N instead. Hypothesis tests that do not set ``derandomize`` themselves draw
their examples from a fixed seed too.
"""

import os
import random
import sys
import zlib

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

try:
    from hypothesis import settings

    settings.register_profile("fixed", derandomize=True, database=None)
    settings.load_profile("fixed")
except ImportError:
    pass


def seed_for(nodeid: str) -> int:
    """``SPARSITY_EXT_SEED`` when set, else a stable 32-bit hash of the test's node id."""
    override = os.environ.get("SPARSITY_EXT_SEED")
    return int(override) if override else zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"replay with SPARSITY_EXT_SEED={value}"))
