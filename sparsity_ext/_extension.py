"""Finding, building and loading the compiled operator.

The extension is looked for in this order: a module built ahead of time by setup.py
(``sparsity_ext._C``), then a just-in-time build with ``torch.utils.cpp_extension.load``
cached under :func:`cache_root`. If both fail, one warning carries the compiler's first
error and the pure-PyTorch reference takes over; ``python -m sparsity_ext info`` shows it.

Environment: ``SPARSITY_EXT_CACHE`` (cache folder), ``SPARSITY_EXT_NO_EXTENSION=1`` (use the
reference only), ``CUDA_HOME`` (the CUDA toolkit; without it CUDA kernels are not built).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# torch guesses the CUDA toolkit from the first `nvcc` on PATH, which a wrapper script
# (e.g. /usr/local/bin/nvcc) can mislead; the standard install location is a better guess.
_STANDARD_CUDA_HOME = Path("/usr/local/cuda")
if (torch.version.cuda is not None and "CUDA_HOME" not in os.environ
        and "CUDA_PATH" not in os.environ and (_STANDARD_CUDA_HOME / "bin" / "nvcc").exists()):
    os.environ["CUDA_HOME"] = str(_STANDARD_CUDA_HOME)
CPU_SOURCES = ("ops.cpp", "launch.cpp", "cpu/channel_stats_cpu.cpp", "cpu/l1_stats_cpu.cpp",
               "cpu/register_cpu.cpp")
CUDA_SOURCES = ("cuda/channel_stats_cuda.cu", "cuda/l1_stats_cuda.cu", "cuda/register_cuda.cpp")
# Ahead-of-time CUDA builds, and `build --cuda` on a machine without a GPU.
PORTABLE_CUDA_ARCHS = ("8.0", "9.0+PTX")


@dataclasses.dataclass
class Status:
    """What the last attempt to get the compiled operator did."""

    loaded: bool = False
    origin: str = "none"  # "ahead-of-time", "jit" or "none"
    devices: tuple[str, ...] = ()
    library: str | None = None
    error: str | None = None
    built: bool = False

    def describe(self) -> str:
        if self.loaded:
            return (f"sparsity_ext: compiled operator loaded ({self.origin}) from {self.library}; "
                    f"kernels for: {', '.join(self.devices)}")
        return f"sparsity_ext: compiled operator unavailable, using the reference ({self.error})"


_status: Status | None = None
_lock = threading.Lock()


def csrc_dir() -> Path:
    """The C++/CUDA sources: inside the package when installed from a wheel, else the repo's."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"sparsity_ext: C++ sources not found next to {PACKAGE_DIR}")


def cache_root() -> Path:
    """Where JIT builds are kept; one sub-folder per (sources, flags, torch) combination."""
    if os.environ.get("SPARSITY_EXT_CACHE"):
        return Path(os.environ["SPARSITY_EXT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sparsity_ext"


def cpu_capability_flags() -> list[str]:
    """Compile at::vec for the host's vector unit; without these it falls back to scalar code."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def cxx_flags() -> list[str]:
    # -fopenmp: without it at::parallel_for silently runs on one thread.
    return ["-O3", "-fopenmp", *cpu_capability_flags()]


def ld_flags() -> list[str]:
    return ["-fopenmp"]


def cuda_flags(archs: tuple[str, ...]) -> list[str]:
    """nvcc flags; explicit -gencode flags also stop torch from adding its own arch list."""
    flags = ["-O3", "-lineinfo"]
    for arch in archs:
        number = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning it logs on a machine with
    no GPU ("No CUDA runtime is found, using CUDA_HOME=..."): here that is the intent."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def cuda_home() -> str | None:
    """The CUDA toolkit torch would compile with, or None (CPU-only torch, no nvcc)."""
    if torch.version.cuda is None:
        return None
    home = _cpp_extension().CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    return None


def sources(with_cuda: bool) -> list[str]:
    root = csrc_dir()
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(root / name) for name in names]


def _jit_archs() -> tuple[str, ...]:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return (f"{major}.{minor}",)
    return PORTABLE_CUDA_ARCHS


def _build_name(with_cuda: bool, archs: tuple[str, ...]) -> str:
    """A name that changes with anything that changes the binary, so caches never go stale."""
    digest = hashlib.sha256()
    root = csrc_dir()
    folders = {Path(name).parent for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())}
    headers = [p for folder in folders for p in (root / folder).glob("*.h*")]
    for path in sorted({*map(Path, sources(with_cuda)), *headers}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cxx_flags() + ld_flags()).encode())
    digest.update(torch.__version__.encode())
    if with_cuda:
        digest.update(" ".join(cuda_flags(archs)).encode())
    variant = "cuda" if with_cuda else "cpu"
    return f"sparsity_ext_{variant}_{digest.hexdigest()[:12]}"


def _first_compiler_error(message: str) -> str:
    for line in message.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()
    return message.strip().splitlines()[-1] if message.strip() else "unknown error"


def _has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "sparsity_ext::channel_stats_forward", key)


def _loaded_status(origin: str, library: str, built: bool = False) -> Status:
    from . import ops

    ops.register_fake_kernels()
    devices = tuple(d for d in ("cpu", "cuda") if _has_kernel(d))
    return Status(loaded=True, origin=origin, devices=devices, library=library, built=built)


def _load_ahead_of_time() -> Status | None:
    """The module setup.py built, if any and if it loads (else the JIT build is tried)."""
    if importlib.util.find_spec("sparsity_ext._C") is None:
        return None
    try:
        module = importlib.import_module("sparsity_ext._C")
    except ImportError as error:  # e.g. built against another torch: undefined symbols
        warnings.warn(f"sparsity_ext: ignoring the ahead-of-time build ({error})",
                      RuntimeWarning, stacklevel=4)
        return None
    return _loaded_status("ahead-of-time", module.__file__)


def _load_jit(with_cuda: bool | None, verbose: bool) -> Status:
    cpp_extension = _cpp_extension()
    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and cuda_home() is not None
    elif with_cuda and cuda_home() is None:
        return Status(error="CUDA requested but no CUDA toolkit found: set CUDA_HOME to the "
                      "folder holding bin/nvcc (and use a CUDA build of PyTorch)")
    archs = _jit_archs() if with_cuda else ()
    name = _build_name(with_cuda, archs)
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    fresh = not library.exists()
    if fresh:
        what = "C++ and CUDA" if with_cuda else "C++"
        print(f"sparsity_ext: compiling the {what} extension into {build_dir} "
              f"(first use; a minute or more)...", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=name,
            sources=sources(with_cuda),
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=cuda_flags(archs) if with_cuda else None,
            extra_ldflags=ld_flags(),
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # a compiler or loader failure: fall back, say why once
        return Status(error=_first_compiler_error(str(error)))
    return _loaded_status("jit", str(library), built=fresh)


def _disabled() -> bool:
    return os.environ.get("SPARSITY_EXT_NO_EXTENSION", "") not in ("", "0")


def load() -> Status:
    """Load the compiled operator once per process (building it if needed)."""
    global _status
    with _lock:
        if _status is None:
            if _disabled():
                _status = Status(error="disabled by SPARSITY_EXT_NO_EXTENSION")
            else:
                try:
                    _status = _load_ahead_of_time() or _load_jit(None, verbose=False)
                except Exception as error:  # no sources, unwritable cache, ...: fall back
                    _status = Status(error=f"{type(error).__name__}: {error}")
                if not _status.loaded:
                    warnings.warn(
                        f"sparsity_ext: could not build the C++ extension, using the slower "
                        f"pure-PyTorch reference. First error: {_status.error}",
                        RuntimeWarning, stacklevel=3)
        return _status


def build(with_cuda: bool | None = None, verbose: bool = False) -> Status:
    """Build ahead of time into the JIT cache (`python -m sparsity_ext build`)."""
    global _status
    with _lock:
        try:
            status = _load_jit(with_cuda, verbose=verbose)
        except Exception as error:
            status = Status(error=f"{type(error).__name__}: {error}")
        if status.loaded and (_status is None or not _status.loaded):
            _status = status
        return status


@torch.compiler.assume_constant_result
def kernel_available(device_type: str) -> bool:
    """True when the compiled operator has a kernel for this device type."""
    return device_type in load().devices


def info() -> str:
    status = load()
    lines = [
        f"torch            {torch.__version__}",
        f"CUDA (torch)     {torch.version.cuda or 'none (CPU-only build)'}",
        f"CUDA toolkit     {cuda_home() or 'not found (set CUDA_HOME)'}",
        f"GPU              {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"CPU capability   {torch.backends.cpu.get_cpu_capability()}",
        f"extension        {'loaded (' + status.origin + ')' if status.loaded else 'not loaded'}",
        f"compiled kernels {', '.join(status.devices) or 'none (reference only)'}",
        f"library          {status.library or '-'}",
        f"cache folder     {cache_root()}",
    ]
    if status.error:
        lines.append(f"error            {status.error}")
    return "\n".join(lines)
