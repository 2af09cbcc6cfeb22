"""The benchmark: a smoke run of every part (slow), and the invariants it relies on."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, SCRIPTS

from benchmarks.bench import make_images, shared_cpu_bound, write_synthetic_cache
from pipeline.cache import read_cache


def test_bench_images_are_imagenet_like_jpegs_that_depend_on_their_index_only(
    tmp_path: Path,
) -> None:
    from PIL import Image

    a = make_images(tmp_path / "a", 6, seed=3)
    b = make_images(tmp_path / "b", 3, start=3, seed=3)  # a folder grown in another order
    for p, q in zip(a[3:], b, strict=True):
        assert p.relative_to(tmp_path / "a") == q.relative_to(tmp_path / "b")
        assert p.read_bytes() == q.read_bytes()
    for p in a:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size in ((500, 375), (375, 500))
    assert len({p.read_bytes() for p in a}) == 6  # crops, flips and noise differ


def test_shared_cpu_bound_is_the_harmonic_combination() -> None:
    assert shared_cpu_bound(100.0, 100.0) == pytest.approx(50.0)
    assert shared_cpu_bound(1e9, 300.0) == pytest.approx(300.0, rel=1e-6)


def test_synthetic_cache_is_a_complete_two_class_cache(tmp_path: Path) -> None:
    path = write_synthetic_cache(tmp_path / "s.h5", 10, feature_shape=(2, 2, 3), chunk=4)
    cache = read_cache(path)
    assert cache.features.shape == (10, 2, 2, 3) and cache.features.dtype == np.float32
    assert cache.labels.tolist() == [i % 2 for i in range(10)]
    assert cache.paths == [f"r{i:07d}.jpg" for i in range(10)]


@pytest.mark.slow
def test_quick_bench_runs_every_part_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [PYTHON, str(SCRIPTS / "bench.py"), "--quick", "--data", str(tmp_path / "data"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["config"]["parts"]) <= set(results)
    for case in results["throughput"]:
        for method in ("a", "b", "d", "e"):
            assert math.isfinite(case["methods"][method]["img_s"])
    assert [r["size"] for r in results["decoders"]] == [96, 150, 224]
    assert results["incremental"]["rerun_pct"] < 100
    assert proc.stdout.rstrip().splitlines()[-1].startswith("bench: raw numbers in")
