"""Build of the C core (src_c/) and its Cython binding (rnnengine/_core.pyx)."""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# Portable x86-64 baseline: no -march flags, so the wheel runs on any CPU
# (optimised kernels pick their instruction set at run time).
_flags = os.environ.get("CFLAGS", "") + " " + os.environ.get("LDFLAGS", "")
_keep_debug = os.environ.get("RNNENGINE_DEBUG") == "1" or "-fsanitize" in _flags or " -g" in " " + _flags

ext = Extension(
    "rnnengine._core",
    sources=["rnnengine/_core.pyx"] + sorted(glob.glob("src_c/*.c")),
    include_dirs=["src_c", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=["-O3", "-fno-math-errno", "-Wall", "-Wpointer-arith", "-pthread"],
    # The shipped extension carries no debug information (about half its size). Sanitizer
    # and debugging builds (CFLAGS with -fsanitize or -g, or RNNENGINE_DEBUG=1) keep it.
    # -pthread: the worker pool of src_c/pool.c
    extra_link_args=["-pthread"] + ([] if _keep_debug else ["-Wl,--strip-debug"]),
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
