"""Building and loading: the command line, the reference fallback when the build fails or is
disabled, the CUDA sources compiling without a GPU, concurrent first use of the cache, a
damaged cache, and the ahead-of-time build with one CPU kernel build per capability."""

import json
import os
import re
import zipfile
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


def copy_package(to: Path) -> Path:
    """The package and its sources without any build in them (an ahead-of-time module in the
    checkout would otherwise be preferred to the JIT build a test is about)."""
    for name in ("sparsity_ext", "csrc"):
        shutil.copytree(ROOT / name, to / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, to / name)
    return to


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
    copy_package(tmp_path)
    kernel = tmp_path / "csrc" / "cpu" / "channel_stats_cpu.cpp"
    kernel.write_text(kernel.read_text() + "\nthis_is_not_cpp;\n")
    code = ("import warnings, torch\n"
            "x = torch.randn(2, 3, 4, 4)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import sparsity_ext as s\n"  # the library loads (here: fails) at import
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
    copy_package(tmp_path)
    env = {**os.environ, "SPARSITY_EXT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
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
    out = run_python(code, {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert out.returncode == 0 and "compiling" not in out.stderr


def test_damage_is_found_from_the_size_and_hash_record(tmp_path):
    library = tmp_path / "build" / "lib.so"
    assert _extension._damage(library) is None  # nothing cached yet: a first build
    library.parent.mkdir()
    assert "missing" in _extension._damage(library)
    library.write_bytes(bytes(range(256)) * 64)
    assert "no valid size-and-hash record" in _extension._damage(library)
    _extension._write_record(library)
    assert _extension._damage(library) is None
    record = json.loads(_extension._record_path(library).read_text())
    assert record["size"] == 256 * 64
    with open(library, "r+b") as handle:  # same size, one byte changed
        handle.write(b"\xff")
    assert "sha256 differs" in _extension._damage(library)
    library.write_bytes(bytes(range(256)) * 32)
    assert f"is {256 * 32} bytes where its build wrote {256 * 64}" in _extension._damage(library)
    _extension._record_path(library).write_text("{")
    assert "no valid size-and-hash record" in _extension._damage(library)


def test_truncated_cached_library_is_rebuilt_and_the_process_lives(tmp_path):
    """A cached .so cut short, with timestamps newer than its sources (ninja would call it up
    to date): loading it would SIGBUS. The next process rebuilds it and gets right results."""
    copy_package(tmp_path / "pkg")
    cache = tmp_path / "cache"
    # Start from this session's build when it has the same name (saves one compile).
    name = _extension._build_name(False, ())
    if not torch.cuda.is_available() and (_extension.cache_root() / name).is_dir():
        shutil.copytree(_extension.cache_root() / name, cache / name)
    code = ("import torch, sparsity_ext as s\n"
            "status = s._extension.load()\n"
            "assert status.loaded, status.describe()\n"
            "x = torch.randn(3, 4, 6, 6, dtype=torch.float64)\n"
            "torch.testing.assert_close(s.entropy(x), s.reference.entropy(x))\n"
            "print(status.library)\n")
    first = run_python(code, {"SPARSITY_EXT_CACHE": str(cache)}, cwd=tmp_path / "pkg")
    assert first.returncode == 0, first.stderr
    library = Path(first.stdout.strip().splitlines()[-1])
    size = library.stat().st_size
    with open(library, "r+b") as handle:
        handle.truncate(size // 2)
    future = library.stat().st_mtime + 3600
    for path in library.parent.iterdir():
        os.utime(path, (future, future))
    second = run_python(code, {"SPARSITY_EXT_CACHE": str(cache)}, cwd=tmp_path / "pkg")
    assert second.returncode == 0, second.stderr  # alive: no SIGBUS (returncode -7)
    assert f"is {size // 2} bytes where its build wrote {size}" in second.stderr
    assert "RuntimeWarning" not in second.stderr  # rebuilt, not fallen back
    # Rebuilt whole and recorded anew (its size may differ from the copied build's: paths
    # compiled into it differ).
    assert _extension._damage(library) is None and library.stat().st_size > size // 2


@pytest.mark.skipif(_extension.cuda_home() is None,
                    reason="needs a CUDA build of PyTorch and nvcc (set CUDA_HOME)")
def test_cuda_kernels_compile_without_a_gpu(tmp_path):
    out = run_python(["-m", "sparsity_ext", "build", "--cuda"],
                     {"SPARSITY_EXT_CACHE": str(tmp_path / "cache")}, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels for: cpu, cuda" in out.stdout, out.stdout


@pytest.mark.skipif(_extension.cuda_home() is None or shutil.which("nvcc") is None,
                    reason="needs a CUDA build of PyTorch, a CUDA toolkit and nvcc on PATH")
def test_setup_py_picks_the_cuda_toolkit_before_torch_guesses_it(tmp_path):
    """torch.utils.cpp_extension fixes CUDA_HOME at import, from the first nvcc on PATH when
    CUDA_HOME is unset; a wrapper there (like /usr/local/bin/nvcc) made the ahead-of-time
    install fail with `cuda_runtime.h: No such file or directory`."""
    wrapper = tmp_path / "wrapper" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("nvcc")} "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(SPARSITY_EXT_BUILD_AOT="1", PATH=f"{wrapper.parent}:{env['PATH']}")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=copy_package(tmp_path / "pkg"),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = str(_extension._STANDARD_CUDA_HOME) if (
        _extension._STANDARD_CUDA_HOME / "bin" / "nvcc").exists() else str(wrapper.parents[1])
    assert f"with {expected}" in out.stderr, out.stderr


def objects_of(build_temp: Path, folder: str) -> list[Path]:
    return sorted((build_temp / folder).rglob("*.o"))


def instruction_sets(obj: Path) -> set[str]:
    """Which vector extensions beyond SSE the object's code uses: "AVX" (VEX-encoded
    instructions, all named v...) and "AVX512" (zmm or opmask registers)."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)],
                             capture_output=True, text=True, check=True).stdout
    found = set()
    if re.search(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+", listing, re.MULTILINE):
        found.add("AVX")
    if re.search(r"%zmm\d|%k[1-7]\b", listing):
        found.add("AVX512")
    return found


@pytest.mark.build
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs binutils (objdump, nm)")
def test_wheel_has_one_kernel_build_per_capability_chosen_at_run_time(tmp_path):
    """The ahead-of-time build as a wheel (what runs on other machines), CPU only: each
    capability's kernels are used where ATen would use that capability, nothing outside the
    AVX2/AVX-512 builds uses their instructions, and the builds share no function (the linker
    keeps one copy of a shared inline function, which could be the AVX-512 one)."""
    package = copy_package(tmp_path / "pkg")
    env = {"SPARSITY_EXT_BUILD_AOT": "1", "CUDA_HOME": str(tmp_path / "no-cuda")}
    out = run_python(["-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                      "-w", str(tmp_path / "dist"), "."], env, cwd=package, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sparsity_ext-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert list(site.glob("sparsity_ext/_C*.so"))

    (build_temp,) = (package / "build").glob("temp.*")
    shared = [o for o in build_temp.rglob("*.o")
              if not any(part in _extension.CPU_CAPABILITY_FLAGS for part in o.parts)]
    assert shared and all(objects_of(build_temp, c) for c in _extension.CPU_CAPABILITY_FLAGS)
    allowed = {"DEFAULT": set(), "AVX2": {"AVX"}, "AVX512": {"AVX", "AVX512"}}
    for capability, sets in allowed.items():
        for obj in objects_of(build_temp, capability):
            assert instruction_sets(obj) <= sets, (obj, instruction_sets(obj))
            symbols = subprocess.run(["nm", "-C", "--defined-only", "--extern-only", str(obj)],
                                     capture_output=True, text=True, check=True).stdout
            functions = [line.split(" ", 2)[2] for line in symbols.splitlines()
                         if line.split(" ")[1] in ("T", "W")]
            # Its own functions, and at::vec's that the compiler kept out of line (the
            # generic Vectorized<float>::exp of the DEFAULT build): at::vec puts them in an
            # inline namespace named after the capability, so no two builds share one either.
            own = (f"sparsity_ext::{capability}::", f"at::vec::{capability}::")
            assert functions and all(f.startswith(own) for f in functions), functions
    for obj in shared:
        assert not instruction_sets(obj), (obj, instruction_sets(obj))

    code = ("import torch, sparsity_ext as s\n"
            "status = s._extension.load()\n"
            "x = torch.randn(2, 19, 7, 7)\n"
            "torch.testing.assert_close(s.entropy(x).double(), s.reference.entropy(x.double()),\n"
            "                           rtol=1e-5, atol=1e-5)\n"
            "print(status.describe())\n")
    for capability in _extension.CPU_CAPABILITY_FLAGS:
        if capability == "AVX512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
            continue
        env = {"PYTHONPATH": str(site), "ATEN_CPU_CAPABILITY": capability.lower(),
               "SPARSITY_EXT_CACHE": str(tmp_path / "cache")}
        out = run_python(code, env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "ahead-of-time" in out.stdout and "compiling" not in out.stderr
        assert f"CPU kernels: {capability} of DEFAULT, AVX2, AVX512" in out.stdout, out.stdout
