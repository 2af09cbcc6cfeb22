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
        "pipeline.cache.writer, pipeline.cache.merge, pipeline.cache.lock"
    )
    assert "keras" not in loaded
    assert "tensorflow" not in loaded


def test_heads_never_import_images_or_bases():
    loaded = _modules_after(
        "import pipeline.heads, pipeline.heads.stream, pipeline.heads.convnet"
    )
    assert "pipeline.images" not in loaded
    assert "pipeline.bases" not in loaded


def test_compare_does_not_depend_on_the_demo():
    assert "pipeline.demo" not in _modules_after("import pipeline.compare")


def test_pickled_heads_name_the_flatten_step_as_they_always_have():
    # model.joblib files written before heads became a package name pipeline.heads._flatten;
    # new ones must too, so old and new files load alike.
    import pickle

    from pipeline.heads import make_head

    data = pickle.dumps(make_head("logreg"))
    assert b"pipeline.heads.registry" not in data
    assert b"pipeline.heads" in data and b"_flatten" in data
    pickle.loads(data)
