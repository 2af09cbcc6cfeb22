"""--shard i/N parts merge into the single-process cache (one process per GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_index_images

from pipeline.cache import CacheError, merge_parts, read_cache, read_row_state
from pipeline.cli import extract_main
from pipeline.extract import ExtractConfig, parse_shard, run_extract, shard_slice


def probe(data, probe_model, out, **kw) -> ExtractConfig:
    return ExtractConfig(str(data), str(probe_model), pooling="avg", preprocess="none",
                         out=str(out), batch_size=4, **kw)


def convnet(data, out, **kw) -> ExtractConfig:
    """A real conv net: its float results would change with the batch a row is run in."""
    return ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32", seed=3,
                         out=str(out), batch_size=4, **kw)


@pytest.mark.parametrize("n", [
    # 11 s each on 2 cores: three shards cover what one and two do (an edge shard, a middle one).
    pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3,
])
def test_sharded_runs_merge_into_the_single_process_cache(tmp_path, n):
    """Features and augmented copies of a real conv net, byte for byte, with an unreadable
    file shifting the rows (23 images in 6 forward batches: shards of 2, 2, 2 batches)."""
    data = tmp_path / "data"
    write_index_images(data, 23, splits=("train", "validation"))
    (data / "train" / "a" / "broken.png").write_bytes(b"")
    single = tmp_path / "single.h5"
    run_extract(convnet(data, single, augment=1))
    parts = []
    for i in range(n):
        part = tmp_path / f"part{i}.h5"
        run_extract(convnet(data, part, augment=1, shard=f"{i}/{n}"))
        parts.append(part)
    merged = tmp_path / "merged.h5"
    assert extract_main(["--merge", *map(str, parts[::-1]), "--out", str(merged)]) == 0
    a, b = read_cache(single, augmented=True), read_cache(merged, augmented=True)
    assert a.paths == b.paths and a.skipped == b.skipped
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.features.tobytes() == b.features.tobytes()
    assert read_row_state(single).sha256 == read_row_state(merged).sha256
    np.testing.assert_array_equal(a.augmented_source, b.augmented_source)
    assert a.augmented_features.tobytes() == b.augmented_features.tobytes()
    assert "shard" not in b.attrs and b.attrs["complete"]


def test_merge_refuses_missing_or_foreign_parts(tmp_path, probe_model):
    data = tmp_path / "data"
    write_index_images(data, 9)
    parts = [tmp_path / f"p{i}.h5" for i in range(3)]
    for i, part in enumerate(parts):
        run_extract(probe(data, probe_model, part, shard=f"{i}/3"))
    with pytest.raises(CacheError, match="shards 0..N-1"):
        merge_parts(parts[:2], tmp_path / "m.h5")
    other = tmp_path / "other.h5"
    run_extract(ExtractConfig(str(data), str(probe_model), pooling="max", preprocess="none",
                              out=str(other), shard="2/3"))
    with pytest.raises(CacheError, match="pooling"):
        merge_parts([parts[0], parts[1], other], tmp_path / "m.h5")


def test_shard_arguments():
    assert parse_shard("1/4") == (1, 4)
    assert [shard_slice(10, (i, 3)) for i in range(3)] == [slice(0, 3), slice(3, 6),
                                                           slice(6, 10)]
    # Shards split between forward batches: 10 images in batches of 4 -> 4 | 4 | 2.
    assert [shard_slice(10, (i, 3), 4) for i in range(3)] == [slice(0, 4), slice(4, 8),
                                                              slice(8, 10)]
    # More shards than batches: some shards are empty, none splits a batch.
    assert [shard_slice(5, (i, 3), 4) for i in range(3)] == [slice(0, 0), slice(0, 4),
                                                             slice(4, 5)]
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="Received: shard="):
            parse_shard(bad)
