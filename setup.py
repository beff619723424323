"""Build of the C core (src_c/) and its Cython binding (rnnengine/_core.pyx)."""
import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# Portable x86-64 baseline: no -march flags, so the wheel runs on any CPU
# (optimised kernels pick their instruction set at run time).
ext = Extension(
    "rnnengine._core",
    sources=["rnnengine/_core.pyx"] + sorted(glob.glob("src_c/*.c")),
    include_dirs=["src_c", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=["-O3", "-fno-math-errno", "-Wall", "-Wpointer-arith"],
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
