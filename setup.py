"""The one thing pyproject.toml cannot say: the optional native kernels.

The sources in perseus_edge/runtime/kernels/ build into a shared library that onnxruntime
loads as a custom-op library (perseus_edge/runtime/kernels/__init__.py). It is optional: where no
C++ compiler is available the install still succeeds and the graphs run their ops' portable
bodies. It is not a Python module (nothing imports it); setuptools just builds and ships it.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "perseus_edge.runtime.kernels._perseus_kernels",
    sources=[f"perseus_edge/runtime/kernels/{name}.cc" for name in ("library", "latent_attention", "sparse_moe", "linear")],
    include_dirs=["perseus_edge/runtime/kernels/include"],
    # -Wno-psabi: GCC notes that 32-byte vector values change the ABI of baseline-ISA calls; the
    # portable loops' vectors (common.h f8) never cross a call
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-maybe-uninitialized", "-Wno-psabi", "-g0"],
    language="c++",
    optional=True,
)])
