"""Finding, building and loading the compiled operator.

The extension is looked for in this order: a module built ahead of time by setup.py
(``sparsity_ext._C``), then a just-in-time build cached under :func:`cache_root`. If both
fail, one warning carries the compiler's first error and the pure-PyTorch reference takes
over; ``python -m sparsity_ext info`` shows it.

The cache cannot crash the process that reads it. A build runs in a child process
(``torch.utils.cpp_extension.load``) into a staging folder, under a lock per build; the
child loads the new library once, then its size and sha256 are recorded next to it and the
folder is renamed into place in one step. A library is loaded only once it matches its
record: a partial or damaged one (a full disk, a killed build, a truncated copy) is rebuilt,
where loading it would kill the process with SIGBUS.

CPU kernels come in one build per CPU capability (``csrc/cpu/cpu_capability.h``): ahead of
time DEFAULT, AVX2 and AVX512, chosen at run time as ATen chooses its own; just in time the
capability of this process only (``ATEN_CPU_CAPABILITY`` lowers it, and gets its own build).

Environment: ``SPARSITY_EXT_CACHE`` (cache folder), ``SPARSITY_EXT_NO_EXTENSION=1`` (use the
reference only), ``CUDA_HOME`` (the CUDA toolkit; without it CUDA kernels are not built),
``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``: which CPU kernels run, as for ATen's own),
``SPARSITY_EXT_CPU_CACHE_MB`` (memory the CPU backward keeps for reuse, default 256; see
``csrc/cpu/recycled_buffers.h``), ``SPARSITY_EXT_AVX512_BF16=0`` (round bfloat16 with
at::vec even where the CPU has AVX512_BF16; see ``csrc/cpu/store_from_float.h``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
# C++ sources compiled once per build.
CPU_SOURCES = ("ops.cpp", "host_prepare.cpp", "cpu/cpu_capability.cpp", "cpu/recycled_buffers.cpp",
               "cpu/register_cpu.cpp")
# CPU kernel files, compiled once per CPU capability: list each once, write it as
# csrc/cpu/cpu_capability.h says (CPU_CAPABILITY namespace, everything else anonymous).
CPU_KERNEL_SOURCES = ("cpu/channel_stats_cpu.cpp", "cpu/l1_stats_cpu.cpp",
                      "cpu/monitor_sums_cpu.cpp")
# at::vec's x86 vector units and their compiler flags, as ATen builds its own kernels.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": (),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"),
}
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
    cpu_kernels: str | None = None  # the CPU kernel build in use, e.g. "AVX2 of DEFAULT, AVX2"

    def describe(self) -> str:
        if self.loaded:
            return (f"sparsity_ext: compiled operator loaded ({self.origin}) from {self.library}; "
                    f"kernels for: {', '.join(self.devices)}; CPU kernels: {self.cpu_kernels}")
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


def host_cpu_capability() -> str:
    """ATen's CPU capability in this process (the CPU's, lowered by ``ATEN_CPU_CAPABILITY``):
    the one build a just-in-time build makes. DEFAULT where it names no x86 vector unit."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in CPU_CAPABILITY_FLAGS else "DEFAULT"


def kernel_cxx_flags(capability: str) -> list[str]:
    """Extra flags of one build of the CPU kernel files. Without the capability (and matching
    -m flags) at::vec compiles to its scalar fallback, about 10x slower."""
    return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
            *CPU_CAPABILITY_FLAGS[capability]]


def cxx_flags(capabilities: tuple[str, ...]) -> list[str]:
    """Flags of every C++ source of a build that links the CPU kernels of ``capabilities``."""
    # -fopenmp: without it at::parallel_for silently runs on one thread.
    return ["-O3", "-fopenmp", *(f"-DSPARSITY_EXT_CPU_KERNELS_{c}" for c in capabilities)]


def jit_cxx_flags() -> list[str]:
    """A just-in-time build compiles every source at once for this process's capability."""
    capability = host_cpu_capability()
    return cxx_flags((capability,)) + kernel_cxx_flags(capability)


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


def sources(with_cuda: bool, kernels: bool = True) -> list[str]:
    """Paths of the sources; ``kernels=False`` leaves out the per-capability CPU kernels."""
    root = csrc_dir()
    names = CPU_SOURCES + (CPU_KERNEL_SOURCES if kernels else ()) + (
        CUDA_SOURCES if with_cuda else ())
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
    folders = {Path(name).parent
               for name in CPU_SOURCES + CPU_KERNEL_SOURCES + (CUDA_SOURCES if with_cuda else ())}
    headers = [p for folder in folders for p in (root / folder).glob("*.h*")]
    for path in sorted({*map(Path, sources(with_cuda)), *headers}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(jit_cxx_flags() + ld_flags()).encode())
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
    devices = tuple(d for d in ("cpu", "cuda") if _has_kernel(d))
    return Status(loaded=True, origin=origin, devices=devices, library=library, built=built)


def _cpu_kernels(library: str) -> str | None:
    """Which CPU kernel build the library runs here (it is already loaded: ctypes only
    finds it again); None for a library without the query."""
    try:
        query = ctypes.CDLL(library).sparsity_ext_cpu_kernels
    except (OSError, AttributeError):
        return None
    query.restype = ctypes.c_char_p
    return query().decode()


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
    status = _loaded_status("ahead-of-time", module.__file__)
    status.cpu_kernels = _cpu_kernels(module.__file__)
    return status


# What a first CPU build costs, measured on the 2-core VM: 50-53 s of compiler CPU time,
# 74-126 s of wall time while other jobs shared the cores.
BUILD_TIME_NOTE = "about 50 s of compiler CPU time, 1-2 minutes on 2 cores; once per machine"


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def _write_record(library: Path) -> None:
    """Record the library's size and sha256 next to it, for :func:`_damage`."""
    data = library.read_bytes()
    record = {"file": library.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _record_path(library).write_text(json.dumps(record))


def _damage(library: Path) -> str | None:
    """Why the cached library must not be loaded (missing, no record, cut short, altered),
    or None when it is the one its build recorded."""
    record_path = _record_path(library)
    if not library.exists():
        return None if not record_path.parent.exists() else "the library is missing"
    try:
        record = json.loads(record_path.read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no valid size-and-hash record (an interrupted or older build)"
    actual = library.stat().st_size
    if actual != size:
        return f"it is {actual} bytes where its build wrote {size}"
    if hashlib.sha256(library.read_bytes()).hexdigest() != digest:
        return "its sha256 differs from its build's"
    return None


@contextlib.contextmanager
def _build_lock(path: Path):
    """One process at a time checks, builds and publishes a build; the lock goes with the
    process that holds it, so a killed build never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, staging and the atomic rename still apply
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Run in a child: build into the staging folder and load the result once there, so a
# compiler crash or a library that cannot load never takes the user's process with it.
_BUILD_IN_CHILD = (
    "import json, sys\n"
    "from torch.utils import cpp_extension\n"
    "cpp_extension.load(**json.loads(sys.argv[1]))\n"
)


def _build_and_publish(name: str, folder: Path, options: dict, verbose: bool) -> str | None:
    """Build library ``name`` into a staging folder, record it and rename the folder to
    ``folder`` (which must not exist). Returns the first error, or None."""
    staging = Path(tempfile.mkdtemp(prefix=f"{name}.staging-", dir=folder.parent))
    try:
        child = subprocess.run(
            [sys.executable, "-c", _BUILD_IN_CHILD,
             json.dumps({**options, "name": name, "build_directory": str(staging),
                         "is_python_module": False, "verbose": verbose})],
            capture_output=True, text=True)
        output = child.stdout + child.stderr
        if verbose:
            print(output, file=sys.stderr, end="", flush=True)
        if child.returncode < 0:
            return f"the new library killed the process that loaded it (signal {-child.returncode})"
        if child.returncode != 0:
            return _first_compiler_error(output)
        _write_record(staging / f"{name}.so")
        staging.rename(folder)  # atomic: other processes see no folder or a complete one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def _load_jit(with_cuda: bool | None, verbose: bool) -> Status:
    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and cuda_home() is not None
    elif with_cuda and cuda_home() is None:
        return Status(error="CUDA requested but no CUDA toolkit found: set CUDA_HOME to the "
                      "folder holding bin/nvcc (and use a CUDA build of PyTorch)")
    archs = _jit_archs() if with_cuda else ()
    name = _build_name(with_cuda, archs)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    library = folder / f"{name}.so"
    built = False
    with _build_lock(root / f"{name}.lock"):
        damage = _damage(library)
        if damage is not None or not library.exists():
            what = "C++ and CUDA" if with_cuda else "C++"
            why = f"the cached build is unusable: {damage}; " if damage else "first use; "
            print(f"sparsity_ext: compiling the {what} extension into {folder} "
                  f"({why}{BUILD_TIME_NOTE})...", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            error = _build_and_publish(name, folder, {
                "sources": sources(with_cuda),
                "extra_cflags": jit_cxx_flags(),
                "extra_cuda_cflags": cuda_flags(archs) if with_cuda else None,
                "extra_ldflags": ld_flags(),
                "with_cuda": with_cuda,
            }, verbose)
            if error is not None:
                return Status(error=error)
            built = True
    torch.ops.load_library(str(library))
    status = _loaded_status("jit", str(library), built=built)
    status.cpu_kernels = _cpu_kernels(str(library))
    return status


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
        f"CPU kernels      {status.cpu_kernels or '-'}",
        f"extension        {'loaded (' + status.origin + ')' if status.loaded else 'not loaded'}",
        f"compiled kernels {', '.join(status.devices) or 'none (reference only)'}",
        f"library          {status.library or '-'}",
        f"cache folder     {cache_root()}",
    ]
    if status.error:
        lines.append(f"error            {status.error}")
    return "\n".join(lines)
