"""Declares the compiled modules; FASTLB_NO_EXTENSIONS=1 skips them all (the uncompiled twins run).

Two kinds, as aiohttp builds its own:
- ``fastlb._core`` from ``_core.pyx``: the pure computations, with the hand-written twin ``_core_py.py``.
- Pure-Python-mode modules: ``X_py.py`` is the one source, ``X_c.py`` a symlink to it and ``X_c.pxd``
  the augmenting declarations Cython compiles it with (typed ``cdef`` classes).  The uncompiled
  ``X_py`` *is* the twin, so the code is never written twice; ``X.py`` chooses one of them.
"""
import os

from setuptools import Extension, setup

# Pure-Python-mode modules compiled through their X_c.py symlink and X_c.pxd.
PURE_MODE = ["fastlb.http.framing_c", "fastlb.http.front_c", "fastlb.http.protocol_c",
             "fastlb.lb.backend_c", "fastlb.lb.balance_c", "fastlb.lb.router_c", "fastlb.net.tlsbio_c"]

ext_modules = []
if os.environ.get("FASTLB_NO_EXTENSIONS") != "1":
    from Cython.Build import cythonize

    sources = [Extension("fastlb._core", ["fastlb/_core.pyx"], extra_compile_args=["-O2"])]
    sources += [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2"])
                for name in PURE_MODE]
    ext_modules = cythonize(
        sources,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
