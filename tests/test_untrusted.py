"""Damaged and hostile files: clear refusals, never a crash or partial data."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers_fit import blobs, make_cache

from pipeline.cache import CacheError, read_cache
from pipeline.fit import FitConfig, run_fit


@pytest.fixture
def cache(tmp_path):
    X, y = blobs(n_per_class=400, n_classes=2, shape=(64,))
    return make_cache(tmp_path / "c.h5", X, y)


def test_truncated_cache_says_re_extract(cache):
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="re-extract"):
        read_cache(cache)


def test_flipped_bytes_in_features_fail_their_checksum(cache):
    with h5py.File(cache) as f:
        start = f["features"].id.get_chunk_info(0).byte_offset
    data = bytearray(cache.read_bytes())
    for i in range(start + 100, start + 132):
        data[i] ^= 0xFF
    cache.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="re-extract"):
        read_cache(cache)


@pytest.mark.parametrize("kind", ["external-link", "soft-link", "virtual", "external-storage"])
def test_links_outside_the_file_are_refused(tmp_path, cache, kind):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as g:
        g["secret"] = np.arange(5)
    with h5py.File(cache, "a") as f:
        if kind == "external-link":
            f["sneaky"] = h5py.ExternalLink(str(other), "secret")
        elif kind == "soft-link":
            f["sneaky"] = h5py.SoftLink("/labels")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(5,), dtype="int64")
            layout[:] = h5py.VirtualSource(str(other), "secret", shape=(5,))
            f.create_virtual_dataset("sneaky", layout)
        else:
            raw = tmp_path / "raw.bin"
            raw.write_bytes(np.arange(5, dtype="int64").tobytes())
            f.create_dataset("sneaky", shape=(5,), dtype="int64", external=[(str(raw), 0, 40)])
    with pytest.raises(CacheError, match="links to data outside the file"):
        read_cache(cache)
    with pytest.raises(CacheError, match="links to data outside the file"):
        run_fit(FitConfig(str(cache), out=str(tmp_path / "m"), stream=True))


def test_tampered_joblib_head_is_refused_before_unpickling(tmp_path, cache):
    import joblib

    from pipeline.heads import load_head

    out = tmp_path / "m"
    run_fit(FitConfig(str(cache), head="logreg", out=str(out)))
    load_head(out)  # the untouched file loads

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    joblib.dump(Boom(), out / "model.joblib")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_head(out)


def test_keras_head_with_lambda_layer_is_refused(tmp_path, cache):
    import keras

    from pipeline.heads import load_head

    out = tmp_path / "d"
    run_fit(FitConfig(str(cache), head="dense", out=str(out), epochs=1))
    inputs = keras.Input((64,))
    evil = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 0)(inputs))
    evil.save(out / "model.keras")
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        load_head(out)
