"""Builds ``armijo_fused._C`` from csrc/ with torch.utils.cpp_extension and ninja.

The C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu)
are added only when the torch doing the build has CUDA, so a CPU-only torch never tries nvcc.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already there.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only on a broken install
    raise SystemExit(
        "armijo_fused builds against the torch that is already installed: install torch first, "
        "then `pip install --no-build-isolation -e .`"
    ) from e

here = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
cuda_sources = rel("csrc/cuda/*.cu")
with_cuda = torch.cuda.is_available() or os.environ.get("ARMIJO_FUSED_FORCE_CUDA") == "1"
with_cuda = with_cuda and torch.version.cuda is not None and bool(cuda_sources)

cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v2"]
if os.uname().machine not in ("x86_64", "AMD64"):
    cxx_flags.remove("-march=x86-64-v2")
extra = {"cxx": cxx_flags}
Ext = CppExtension
if with_cuda:
    Ext = CUDAExtension
    sources += cuda_sources
    extra["nvcc"] = ["-O3", "--use_fast_math"]

ext_modules = []
if sources and os.environ.get("ARMIJO_FUSED_NO_EXT") != "1":
    ext_modules.append(
        Ext(
            name="armijo_fused._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("ARMIJO_WITH_CUDA", "1")] if with_cuda else [],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    )

setup(
    packages=[
        "armijo_fused",
        "armijo_fused.directions",
        "armijo_fused.optimizers",
        "armijo_fused.linesearch",
        "armijo_fused.storage",
        "armijo_fused.backends",
        "armijo_fused.integrations",
        "armijo_fused.diagnostics",
        "armijo_fused.kernels",
    ],
    package_dir={"armijo_fused": "python/armijo_fused", "armijo_fused.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
