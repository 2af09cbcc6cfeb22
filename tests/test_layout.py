"""The house rules of issue 14, checked in a fresh interpreter: light stages stay light."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def _modules_after(statement: str) -> set[str]:
    """Top-level names in ``sys.modules`` after running ``statement`` in a new process."""
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()} | set(out.split())


def test_the_cache_never_imports_keras():
    loaded = _modules_after(
        "import pipeline.cache, pipeline.cache.schema, pipeline.cache.read, "
        "pipeline.cache.writer, pipeline.cache.merge, pipeline.cache.lock, pipeline.lock"
    )
    assert "keras" not in loaded
    assert "tensorflow" not in loaded
