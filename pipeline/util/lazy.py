"""Packages whose public names load on first use (PEP 562).

A package ``__init__`` that imports its modules eagerly makes ``from pipeline.bases.registry
import POOLINGS`` load Keras and TensorFlow (~7 s on 2 cores). The command line needs such
constants for ``--help`` and argument checks that answer in a fraction of a second, so the
stage packages name where each public name lives and import that module when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose names live in ``homes``.

    Args:
        package: the package's ``__name__``, named in the AttributeError.
        homes: public name -> the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home), name)

    def __dir__() -> list[str]:
        return sorted(homes)

    return __getattr__, __dir__
