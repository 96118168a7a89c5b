"""Packaging. A plain `pip install -e .` compiles nothing and needs no torch at build time:
the operator is JIT-compiled on first use (see sparsity_ext/_extension.py).

To compile ahead of time instead, with torch already installed:

    SPARSITY_EXT_BUILD_AOT=1 pip install -e . --no-build-isolation

which builds `sparsity_ext._C` for this machine's CPU (and, when PyTorch has CUDA and
CUDA_HOME points at nvcc, the CUDA kernels for sm_80 and sm_90 + PTX).
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


def ahead_of_time_extensions():
    import torch
    from torch.utils import cpp_extension

    # Load the flag logic without importing the package (its __init__ is not needed here).
    spec = importlib.util.spec_from_file_location("_extension", ROOT / "sparsity_ext" / "_extension.py")
    config = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = config  # dataclasses look their module up there
    spec.loader.exec_module(config)

    with_cuda = config.cuda_home() is not None
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(s, ROOT) for s in config.sources(with_cuda)]
    extra = {"cxx": config.cxx_flags()}
    if with_cuda:
        extra["nvcc"] = config.cuda_flags(config.PORTABLE_CUDA_ARCHS)
    ext = kind("sparsity_ext._C", sources, extra_compile_args=extra,
               extra_link_args=config.ld_flags())
    return [ext], {"build_ext": cpp_extension.BuildExtension, "build_py": BuildPyWithSources}


if os.environ.get("SPARSITY_EXT_BUILD_AOT", "") not in ("", "0"):
    ext_modules, cmdclass = ahead_of_time_extensions()
else:
    ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
