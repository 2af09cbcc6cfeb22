"""Property tests over the cache writer: any batching, skips and interruptions keep the
invariants (one row per readable file, row i belongs to file i, complete only at the end)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cache import CacheError, CacheWriter, partial_path, read_cache

ATTRS = {"base": "probe", "weights": "none", "layer": "x", "pooling": "avg",
         "input_size": [8, 8], "interpolation": "bilinear", "preprocess": "none",
         "dtype": "float32", "class_names": ["a", "b"]}


def run_batches(writer: CacheWriter, files: list[tuple[str, bool]], batch: int,
                stop_after: int | None) -> bool:
    """Write the files not yet committed in batches of ``batch`` readable files, stopping
    (as a kill would) after ``stop_after`` commits. Returns True when all were written."""
    done = writer.done_paths()
    rows, skipped, commits = [], [], 0
    todo = [(name, ok) for name, ok in files if name not in done]
    for k, (name, readable) in enumerate(todo):
        if readable:
            rows.append(name)
        else:
            skipped.append((name, "unreadable"))
        if len(rows) == batch or k == len(todo) - 1:
            if stop_after is not None and commits == stop_after:
                return False
            index = np.array([int(n[1:]) for n in rows], dtype=np.float32)
            writer.append(np.stack([index, -index], axis=1) if rows else np.zeros((0, 2)),
                          [int(n[1:]) % 2 for n in rows], rows, ["train"] * len(rows), skipped)
            rows, skipped, commits = [], [], commits + 1
    return True


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 40),
    unreadable=st.sets(st.integers(0, 39)),
    batch=st.integers(1, 9),
    stops=st.lists(st.integers(0, 6), max_size=3),
)
def test_writer_invariants_hold_under_any_interruptions(tmp_path_factory, n, unreadable, batch,
                                                        stops):
    out = tmp_path_factory.mktemp("prop") / "c.h5"
    files = [(f"f{i:03d}", i not in unreadable) for i in range(n)]
    writer = CacheWriter.create(out, attrs=ATTRS, feature_shape=(2,), dtype="float32")
    for stop in [*stops, None]:
        finished = run_batches(writer, files, batch, stop)
        writer.close()
        if finished:
            break
        with pytest.raises(CacheError):  # never complete-looking at the final path
            read_cache(out)
        # Resume as extract does: read the committed rows back into a fresh file.
        resumed = CacheWriter.resume(out)
        writer = resumed.rewrite(np.arange(resumed.n_rows), np.arange(resumed.n_skipped))
    writer = CacheWriter.resume(out)
    run_batches(writer, files, batch, None)
    writer.finish()
    assert not partial_path(out).exists()
    cache = read_cache(out)
    readable = [name for name, ok in files if ok]
    assert cache.paths == readable  # each readable file once, in order
    assert sorted(p for p, _ in cache.skipped) == [name for name, ok in files if not ok]
    for row, name in enumerate(cache.paths):  # row i belongs to file i
        assert cache.features[row].tolist() == [int(name[1:]), -int(name[1:])]
        assert cache.labels[row] == int(name[1:]) % 2
    assert cache.attrs["complete"] is True
