"""Declares the Cython extension fastlb._core; FASTLB_NO_EXTENSIONS=1 skips it (pure-Python twin only)."""
import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("FASTLB_NO_EXTENSIONS") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("fastlb._core", ["fastlb/_core.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
