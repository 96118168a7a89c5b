"""Packaging. A plain `pip install -e .` compiles nothing and needs no torch at build time:
the operator is JIT-compiled on first use (see sparsity_ext/_extension.py).

To compile ahead of time instead, with torch already installed:

    SPARSITY_EXT_BUILD_AOT=1 pip install -e . --no-build-isolation

which builds `sparsity_ext._C`: the CPU kernels once per CPU capability (DEFAULT, AVX2,
AVX512; the library picks one at run time, so the build runs on any x86-64 CPU) and, when
PyTorch has CUDA and a toolkit is found (CUDA_HOME, else /usr/local/cuda), the CUDA
kernels for sm_80 and sm_90 + PTX.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so a non-editable install can still JIT-build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "sparsity_ext" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def build_config():
    """sparsity_ext/_extension.py (sources, flags, capabilities), without importing the
    package. Loaded before torch.utils.cpp_extension: it picks CUDA_HOME (the standard
    /usr/local/cuda over the first nvcc on PATH, which may be a wrapper), and
    cpp_extension reads CUDA_HOME once, when first imported."""
    spec = importlib.util.spec_from_file_location("_extension", ROOT / "sparsity_ext" / "_extension.py")
    config = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = config  # dataclasses look their module up there
    spec.loader.exec_module(config)
    return config


def ahead_of_time_extensions():
    config = build_config()
    from torch.utils import cpp_extension  # only now: see build_config

    capabilities = tuple(config.CPU_CAPABILITY_FLAGS)

    class BuildPerCpuCapability(cpp_extension.BuildExtension):
        """Compiles each CPU kernel file once per capability, into a folder of its own, and
        links all the builds; the library picks one at run time (csrc/cpu/cpu_capability.h)."""

        def build_extension(self, ext):
            kernels = [str(config.csrc_dir() / name) for name in config.CPU_KERNEL_SOURCES]
            for capability in capabilities:
                flags = dict(ext.extra_compile_args)  # torch's flags are in by now
                flags["cxx"] = flags["cxx"] + config.kernel_cxx_flags(capability)
                ext.extra_objects += self.compiler.compile(
                    kernels, output_dir=os.path.join(self.build_temp, capability),
                    include_dirs=ext.include_dirs, extra_postargs=flags, depends=ext.depends)
            super().build_extension(ext)

    with_cuda = config.cuda_home() is not None
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(s, ROOT) for s in config.sources(with_cuda, kernels=False)]
    extra = {"cxx": config.cxx_flags(capabilities)}
    if with_cuda:
        extra["nvcc"] = config.cuda_flags(config.PORTABLE_CUDA_ARCHS)
    print(f"sparsity_ext: building ahead of time: CPU kernels for {', '.join(capabilities)}; "
          + (f"CUDA kernels for {', '.join(config.PORTABLE_CUDA_ARCHS)} with {config.cuda_home()}"
             if with_cuda else "no CUDA kernels (no CUDA build of torch, or no nvcc)"),
          file=sys.stderr)
    ext = kind("sparsity_ext._C", sources, extra_compile_args=extra,
               extra_link_args=config.ld_flags())
    return [ext], {"build_ext": BuildPerCpuCapability, "build_py": BuildPyWithSources}


if os.environ.get("SPARSITY_EXT_BUILD_AOT", "") not in ("", "0"):
    ext_modules, cmdclass = ahead_of_time_extensions()
else:
    ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
