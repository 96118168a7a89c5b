"""Building and loading: the command line, the reference fallback when the build fails or is
disabled, the CUDA sources compiling without a GPU, and concurrent first use of the cache."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsity_ext import _extension

ROOT = Path(__file__).resolve().parents[1]


def run_python(code_or_args, env_extra, cwd=ROOT, timeout=900):
    env = {**os.environ, **env_extra}
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info_names_versions_devices_and_cache():
    out = run_python(["-m", "sparsity_ext", "info"], {})
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout
    assert "compiled kernels" in out.stdout and "cpu" in out.stdout.split("compiled kernels")[1]
    assert str(_extension.cache_root()) in out.stdout


def test_disabled_extension_falls_back_to_the_reference():
    code = ("import torch, sparsity_ext as s\n"
            "x = torch.randn(2, 3, 5, 5)\n"
            "assert torch.equal(s.entropy(x), s.reference.entropy(x))\n"
            "print(s._extension.load().describe())")
    out = run_python(code, {"SPARSITY_EXT_NO_EXTENSION": "1"})
    assert out.returncode == 0, out.stderr
    assert "using the reference" in out.stdout and "SPARSITY_EXT_NO_EXTENSION" in out.stdout


def test_failed_build_warns_once_with_the_compiler_error_and_falls_back(tmp_path):
    # A copy of the package whose kernel source does not compile.
    shutil.copytree(ROOT / "sparsity_ext", tmp_path / "sparsity_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    kernel = tmp_path / "csrc" / "cpu" / "channel_stats_cpu.cpp"
    kernel.write_text(kernel.read_text() + "\nthis_is_not_cpp;\n")
    code = ("import warnings, torch, sparsity_ext as s\n"
            "x = torch.randn(2, 3, 4, 4)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    a = s.entropy(x); b = s.entropy(x)\n"
            "assert torch.equal(a, s.reference.entropy(x))\n"
            "msgs = [str(w.message) for w in caught if 'sparsity_ext' in str(w.message)]\n"
            "assert len(msgs) == 1, msgs\n"
            "print(msgs[0])\n"
            "print(s._extension.info())")
    out = run_python(code, {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "this_is_not_cpp" in out.stdout and "error" in out.stdout
    assert "not loaded" in out.stdout


def test_concurrent_first_use_builds_once_and_both_load(tmp_path):
    """Two processes start on an empty cache at once: one builds, the other waits and reuses."""
    code = ("import torch, sparsity_ext as s\n"
            "x = torch.randn(3, 4, 6, 6)\n"
            "assert s._extension.kernel_available('cpu'), s._extension.load().describe()\n"
            "torch.testing.assert_close(s.entropy(x), s.reference.entropy(x))\n")
    env = {**os.environ, "SPARSITY_EXT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    announced = sum("compiling the C++ extension" in err for _, err in results)
    assert announced >= 1
    libraries = list((tmp_path / "cache").rglob("*.so"))
    assert len(libraries) == 1, libraries
    # A third process reuses the cache without compiling.
    out = run_python(code, {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0 and "compiling" not in out.stderr


@pytest.mark.skipif(_extension.cuda_home() is None,
                    reason="needs a CUDA build of PyTorch and nvcc (set CUDA_HOME)")
def test_cuda_kernels_compile_without_a_gpu(tmp_path):
    out = run_python(["-m", "sparsity_ext", "build", "--cuda"],
                     {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")}, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels for: cpu, cuda" in out.stdout, out.stdout


def test_setup_py_builds_ahead_of_time_and_the_module_is_preferred(tmp_path):
    for name in ("sparsity_ext", "csrc"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    # CPU only here (no toolkit at that path); the CUDA build is checked above.
    env = {"SPARSITY_EXT_BUILD_AOT": "1", "CUDA_HOME": str(tmp_path / "no-cuda")}
    out = run_python(["setup.py", "-q", "build_ext", "--inplace"], env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    code = ("import torch, sparsity_ext as s\n"
            "x = torch.randn(2, 3, 7, 7)\n"
            "torch.testing.assert_close(s.entropy(x), s.reference.entropy(x))\n"
            "print(s._extension.load().describe())")
    out = run_python(code, {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ahead-of-time" in out.stdout and "compiling" not in out.stderr
