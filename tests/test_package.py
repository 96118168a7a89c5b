"""The package's shape: the operator library needs torch alone; the application sits beside it."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPLICATION_LIBRARIES = ("pandas", "matplotlib", "sklearn", "tqdm", "lightning")


def test_core_requirements_name_no_application_library():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
             for req in project["dependencies"]}
    assert names <= {"torch", "numpy", "ninja", "packaging"}, names
    assert {"pandas", "matplotlib", "scikit-learn", "tqdm"} <= set(
        project["optional-dependencies"]["app"])


def test_ops_and_monitor_work_without_the_application_libraries():
    """Every application library made unimportable (torch may still probe whether they are
    installed): import, forward, backward, monitor, penalty and the overfitting report
    work, and none of them was imported."""
    code = f"""
import builtins, importlib, sys
BLOCKED = {APPLICATION_LIBRARIES!r}
def blocking(real):
    def load(name, *args, **kwargs):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)")
        return real(name, *args, **kwargs)
    return load
builtins.__import__ = blocking(builtins.__import__)
importlib.import_module = blocking(importlib.import_module)
import torch, sparsity_ext
x = torch.randn(2, 3, 5, 5, requires_grad=True)
for normalize in ("softmax", "l1"):
    sparsity_ext.sparsity(x, normalize=normalize).sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
monitor = sparsity_ext.SparsityMonitor(model)
penalty = sparsity_ext.SparsityPenalty(monitor, 0.1)
(model(torch.randn(4, 1, 8, 8)).sum() + penalty()).backward()
records = monitor.end_epoch(1)
assert [r.layer for r in records] == ["1"], records
report = sparsity_ext.overfitting_warning(monitor.history, [dict(epoch=1, test_loss=1.0)])
assert not report.overfitting
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "an app library loaded"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
