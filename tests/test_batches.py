"""decoded_batches: every file in exactly one batch, in order, with its own pixels, under
every decoder, worker count, batch size and starting position; a dying worker is named."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import signal

import numpy as np
import pytest
from conftest import bad_files, write_index_images

from pipeline.images import decoded_batches, load_image
from pipeline.util.quiet import is_noise

SIZE = (6, 5)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list:
    """Index-encoding images with unreadable files between them, sorted as a folder is."""
    root = tmp_path_factory.mktemp("batches")
    write_index_images(root, 9, classes=("a", "b", "c"))
    bad_files(root / "b")
    return sorted(p for p in root.rglob("*") if p.is_file())


# Spawned workers import TensorFlow to decode PNGs (~10 s each on 2 cores): fewer cases.
CASES = [(decode, workers, batch_size, start)
         for decode, workers in (("threads", 1), ("threads", 3))
         for batch_size, start in ((1, 0), (4, 0), (5, 3), (64, 2))]
CASES += [("processes", 2, 5, 3), ("processes", 1, 64, 2)]


@pytest.mark.parametrize("decode, workers, batch_size, start", CASES)
def test_every_file_once_in_its_batch_with_its_pixels(files, decode, workers, batch_size,
                                                      start, capfd):
    paths = files[start:]
    positions = list(range(start, start + len(paths)))  # a resume: the run's own batches
    batches = decoded_batches(paths, size=SIZE, batch_size=batch_size, workers=workers,
                              decode=decode, positions=positions)
    seen: list[int] = []
    n_batches = 0
    for batch in batches:  # a batch is valid until the next is asked for
        n_batches += 1
        members = sorted([*batch.indices, *(i for i, _ in batch.skipped)])
        groups = {positions[i] // batch_size for i in members}
        assert len(groups) == 1, "a batch holds the files of one forward pass"
        seen += members
        assert batch.images.shape == (len(batch.indices), *SIZE, 3)
        for row, i in enumerate(batch.indices):
            np.testing.assert_array_equal(batch.images[row], load_image(paths[i], SIZE))
            assert batch.digests[row] == hashlib.sha256(paths[i].read_bytes()).hexdigest()
        for i, reason in batch.skipped:
            assert reason and paths[i].parent.name == "b"
    assert seen == list(range(len(paths)))
    expected_groups = sorted({p // batch_size for p in positions})
    assert n_batches == len(expected_groups)
    # a spawned worker loads TensorFlow for PNGs, without its start-up lines
    assert not any(is_noise(line) for line in capfd.readouterr().err.splitlines())


@pytest.mark.parametrize("decode, mode", [("threads", "tf"), ("threads", "torch"),
                                          ("threads", "scale"), ("processes", "caffe")])
def test_the_decoders_preprocess_each_image_in_its_slot(files, decode, mode):
    """decoded_batches(preprocess=...): each row is Keras' preprocessing of the image's
    pixels, bit for bit, also after skipped files moved the rows up."""
    from pipeline.bases import preprocess

    batches = decoded_batches(files, size=SIZE, batch_size=5, workers=2, decode=decode,
                              preprocess=mode)
    rows = 0
    for batch in batches:
        assert batch.preprocess == mode
        for row, i in enumerate(batch.indices):
            expected = preprocess(load_image(files[i], SIZE)[None], mode)[0]
            assert batch.images[row].tobytes() == np.ascontiguousarray(expected).tobytes()
            rows += 1
    assert rows == 9


def test_an_unknown_preprocess_mode_is_refused_before_decoding(files):
    with pytest.raises(ValueError, match=r"Received: preprocess='mean'"):
        next(decoded_batches(files, size=SIZE, preprocess="mean"))


def test_a_worker_killed_mid_run_is_named(files):
    batches = decoded_batches(files * 20, size=SIZE, batch_size=4, workers=2,
                              decode="processes")
    next(batches)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="A decode worker process died"):
        for _ in batches:
            pass


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list:
    """JPEGs only: spawned workers decode them without importing TensorFlow (fast)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    paths = [root / f"{i}.jpg" for i in range(7)]
    for i, path in enumerate(paths):
        Image.fromarray(np.full((8, 9, 3), 30 * i, np.uint8)).save(path, quality=95)
    return paths


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_batch_kept_after_the_run_stays_valid_and_the_shared_ring_is_freed(jpegs):
    kept = None
    for batch in decoded_batches(jpegs, size=SIZE, batch_size=2, workers=1,
                                 decode="processes"):
        kept = batch  # the last batch is still held when the run ends
    np.testing.assert_array_equal(kept.images[0], load_image(jpegs[6], SIZE))
    ring = kept.images
    while isinstance(ring, np.ndarray):
        ring = ring.base
    if os.path.isdir("/dev/shm"):
        assert not os.path.exists(f"/dev/shm/{ring.shm.name}"), "the name is unlinked"
    del kept, batch, ring
    gc.collect()  # the mapping closes with the last view, without an unraisable error


def test_a_ring_that_does_not_fit_in_shared_memory_is_refused_or_left_to_threads(
        jpegs, monkeypatch, caplog):
    from pipeline.images import batches as module

    monkeypatch.setattr(module, "_free_shared_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"--shm-size=.*Received: decode='processes'"):
        next(decoded_batches(jpegs, size=SIZE, batch_size=2, workers=1, decode="processes"))
    monkeypatch.setattr(module.os, "cpu_count", lambda: 4)  # auto would pick processes
    with caplog.at_level("WARNING"):
        got = [i for b in decoded_batches(jpegs, size=SIZE, batch_size=2) for i in b.indices]
    assert got == list(range(len(jpegs)))
    assert "Decoding in threads" in caplog.text
