"""Which build runs: the compiled data-path modules, or (``FASTLB_NO_EXTENSIONS=1``) their sources.

Each such module is written once, in Cython's pure-Python mode, as aiohttp builds ``reader_c`` from
``reader_py``: ``X_py.py`` is the source and runs as it is; ``X_c.py`` is a symlink to it that Cython
compiles with the augmenting ``X_c.pxd`` (see setup.py); ``X.py`` picks one with `load`.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
Because ``X_c.py`` is the symlinked source, Python would otherwise import it uncompiled when the
extension is missing and run several times slower without a word.
"""

import importlib
import os
from types import ModuleType

EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS") != "1"


def load(name: str) -> ModuleType:
    """``name + "_c"``, compiled; or ``name + "_py"`` with FASTLB_NO_EXTENSIONS=1."""
    if not EXTENSIONS:
        return importlib.import_module(name + "_py")
    module = importlib.import_module(name + "_c")
    if not module.__file__.endswith(".so"):
        raise ImportError(f"{name}_c is not compiled ({module.__file__}): build the extension "
                          "(python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    return module
