"""Chooses the compiled ``balance_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``balance_py``.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
``balance_c.py`` is a symlink to the source, so Python would import it uncompiled when the extension
is missing: that is checked here rather than run several times slower without a word.
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.lb.balance_py import (
        ALGORITHMS,
        Balancer,
        LeastConn,
        MaglevHash,
        PowerOfTwo,
        SmoothRoundRobin,
        WeightedRandom,
        hash_key_getter,
        make_balancer,
    )

    EXTENSION = False
else:
    from fastlb.lb import balance_c

    if not balance_c.__file__.endswith((".so", ".pyd")):
        raise ImportError(f"fastlb.lb.balance_c is not compiled ({balance_c.__file__}): build the "
                          "extension (python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    from fastlb.lb.balance_c import (  # type: ignore[no-redef]
        ALGORITHMS,
        Balancer,
        LeastConn,
        MaglevHash,
        PowerOfTwo,
        SmoothRoundRobin,
        WeightedRandom,
        hash_key_getter,
        make_balancer,
    )

    EXTENSION = True

__all__ = [
    "EXTENSION",
    "ALGORITHMS",
    "Balancer",
    "LeastConn",
    "MaglevHash",
    "PowerOfTwo",
    "SmoothRoundRobin",
    "WeightedRandom",
    "hash_key_getter",
    "make_balancer",
]
