"""extract: alignment, equality with plain Keras, skipped files, resume, re-runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    PYTHON,
    SCRIPTS,
    bad_files,
    index_pixel,
    popen_interruptible,
    save_png,
    write_index_images,
)

from pipeline.cache import CacheError, partial_path, read_cache
from pipeline.extract import ExtractConfig, run_extract


def probe_config(data: Path, probe: Path, out: Path, **kw) -> ExtractConfig:
    """Extraction through the identity probe: features = each image's colour."""
    return ExtractConfig(str(data), str(probe), pooling="avg", preprocess="none",
                         out=str(out), **kw)


def check_alignment(cache_path: Path, expected: dict[str, int], classes: list[str]) -> None:
    """Every row's features, label and split agree with the file named in its path."""
    cache = read_cache(cache_path)
    assert sorted(cache.paths) == sorted(expected), "one row per readable image, no more"
    for row, path in enumerate(cache.paths):
        i = expected[path]
        label = classes.index(path.split("/")[-2])
        np.testing.assert_allclose(cache.features[row], index_pixel(i, label), atol=1e-3)
        assert cache.labels[row] == label
        first = path.split("/")[0]
        assert cache.split[row] == (first if first in ("train", "validation", "test") else "")


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_rows_align_with_paths_and_labels(tmp_path, probe_model, batch_size):
    data = tmp_path / "data"
    expected = write_index_images(data, 45)  # 45 is divisible by none of 7 and 32
    bad = bad_files(data / "b")  # unreadable files inside a class, between good ones
    result = run_extract(probe_config(data, probe_model, tmp_path / "c.h5",
                                      batch_size=batch_size))
    assert result.n_rows == 45 and result.n_skipped == len(bad)
    check_alignment(tmp_path / "c.h5", expected, ["a", "b", "c"])
    cache = read_cache(tmp_path / "c.h5")
    reasons = dict(cache.skipped)
    for name, fragment in bad.items():
        assert fragment in reasons[f"b/{name}"]


def test_split_layout_records_each_split(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 30, splits=("train", "validation", "test"))
    run_extract(probe_config(data, probe_model, tmp_path / "c.h5", batch_size=4))
    check_alignment(tmp_path / "c.h5", expected, ["a", "b", "c"])
    cache = read_cache(tmp_path / "c.h5")
    assert set(cache.split) == {"train", "validation", "test"}
    assert cache.attrs["layout"] == "splits"


def test_features_equal_plain_keras_forward_pass(tmp_path):
    """Cache rows equal image_dataset_from_directory -> preprocess_input -> base.predict."""
    import keras

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("x", "y"):
        (data / c).mkdir(parents=True)
        for i in range(6):
            h, w = rng.integers(20, 60, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            save_png(pixels, data / c / f"{i}.png")
    out = tmp_path / "m.h5"
    run_extract(ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="48",
                              pooling="avg", batch_size=5, out=str(out), seed=3))
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(48, 48), shuffle=False, batch_size=64, label_mode="int")
    x, y = next(iter(ds))
    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                          input_shape=(48, 48, 3), pooling="avg")
    reference = base.predict(keras.applications.mobilenet_v2.preprocess_input(
        np.array(x)), verbose=0)
    cache = read_cache(out)
    assert cache.paths == [Path(p).relative_to(data).as_posix() for p in ds.file_paths]
    np.testing.assert_array_equal(cache.labels, np.array(y))
    np.testing.assert_allclose(cache.features, reference, rtol=1e-4, atol=1e-5)


def test_rerun_does_nothing_and_new_images_are_appended(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 20)
    out = tmp_path / "c.h5"
    run_extract(probe_config(data, probe_model, out, batch_size=8))
    before = out.stat().st_mtime_ns
    again = run_extract(probe_config(data, probe_model, out, batch_size=8))
    assert again.status == "up-to-date"
    assert out.stat().st_mtime_ns == before
    # Ten more images: only those are extracted, and all rows stay aligned.
    more = write_index_images(tmp_path / "more", 30)
    for rel, i in more.items():
        if i >= 20:
            target = data / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path / "more" / rel, target)
            expected[rel] = i
    added = run_extract(probe_config(data, probe_model, out, batch_size=8))
    assert added.n_new_rows == 10 and added.n_rows == 30
    check_alignment(out, expected, ["a", "b", "c"])


def test_other_configuration_is_refused(tmp_path, probe_model):
    data = tmp_path / "data"
    write_index_images(data, 6)
    out = tmp_path / "c.h5"
    run_extract(probe_config(data, probe_model, out))
    with pytest.raises(CacheError, match=r"pooling: cache has 'avg', this run has 'max'"):
        run_extract(ExtractConfig(str(data), str(probe_model), pooling="max",
                                  preprocess="none", out=str(out)))


def test_float16_cache(tmp_path, probe_model):
    data = tmp_path / "data"
    expected = write_index_images(data, 12)
    out = tmp_path / "c.h5"
    run_extract(probe_config(data, probe_model, out, dtype="float16"))
    with h5py.File(out) as f:
        assert f["features"].dtype == np.float16
    check_alignment(out, expected, ["a", "b", "c"])


def datasets(path: Path) -> dict[str, bytes]:
    """Every dataset of a cache as raw bytes (for byte-for-byte comparison)."""
    out = {}
    with h5py.File(path) as f:
        for name in ("features", "labels", "paths", "split", "sha256", "skipped/paths",
                     "skipped/reasons"):
            values = f[name][:]
            out[name] = values.tobytes() if values.dtype != object else repr(list(values)).encode()
    return out


def extract_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, str(SCRIPTS / "extract.py"), str(data), "--base", "mobilenetv2",
            "--weights", "none", "--input-size", "32", "--batch-size", "2",
            "--out", str(out), "--log-every", "0.001", *extra]


def run_until_progress(cmd: list[str], min_done: int) -> subprocess.Popen:
    """Start ``cmd`` and return once it has logged ``min_done`` images done (or ended)."""
    proc = popen_interruptible(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        # Progress lines only ("extract: 12/243 (5%), ..."), not messages naming a path.
        progress = re.search(r"^(?:\S+ \S+ )?extract: (\d+)/\d+ \(", line)
        if progress and int(progress.group(1)) >= min_done:
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("extraction never reported progress")
    return proc  # finished before reaching min_done (a resumed run with little left)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of real-looking images and the cache of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(1)
    for c in ("p", "q"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(120):
            save_png(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                       root / "data" / c / f"{i:03d}.png")
    bad_files(root / "data" / "q")
    reference = root / "reference.h5"
    # In this process: the same code as the script, one TensorFlow start-up less.
    run_extract(ExtractConfig(str(root / "data"), "mobilenetv2", weights="none",
                              input_size="32", batch_size=2, out=str(reference)))
    return root / "data", reference


@pytest.mark.parametrize("how", [
    "SIGKILL", "SIGINT",
    # SIGTERM takes the same path as SIGINT but for the exit code (22 s on 2 cores).
    pytest.param("SIGTERM", marks=pytest.mark.slow),
])
def test_interrupted_run_resumes_to_identical_cache(tmp_path, resume_data, how):
    data, reference = resume_data
    out = tmp_path / "c.h5"
    proc = run_until_progress(extract_cmd(data, out), min_done=20)
    proc.send_signal(getattr(signal, how))
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert not out.exists(), "an incomplete cache must never sit at the final path"
    assert partial_path(out).exists()
    if how != "SIGKILL":
        assert proc.returncode == (130 if how == "SIGINT" else 143)
        assert "Run the same command again to resume" in rest.splitlines()[-1]
    with pytest.raises(CacheError, match="resume"):
        read_cache(out)
    resumed = subprocess.run(extract_cmd(data, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert datasets(out) == datasets(reference)
    # Not a terminal: timestamped progress lines in the log, and a last line saying what
    # happened.
    lines = [ln for ln in resumed.stderr.splitlines() if "img/s, ETA" in ln]
    assert lines, resumed.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert re.match(stamp + r"extract: \d+/\d+ \(\d+%\), ", lines[-1]), lines[-1]
    assert re.search("^" + stamp + "extract: resuming after", resumed.stderr, re.M), resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1].startswith("extract: done.")


def test_changed_base_file_is_never_up_to_date(tmp_path, probe_model):
    import shutil

    import keras

    data = tmp_path / "data"
    write_index_images(data, 6)
    base = tmp_path / "base.keras"
    shutil.copy(probe_model, base)
    out = tmp_path / "c.h5"
    run_extract(probe_config(data, base, out))
    model = keras.models.load_model(base)
    model.layers[-1].set_weights([w * 2 for w in model.layers[-1].get_weights()])
    model.save(base)
    with pytest.raises(CacheError, match="base_sha256"):
        run_extract(probe_config(data, base, out))


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compressed_cache_holds_the_same_features(tmp_path, probe_model, compression):
    data = tmp_path / "data"
    write_index_images(data, 12)
    plain, packed = tmp_path / "plain.h5", tmp_path / "packed.h5"
    run_extract(probe_config(data, probe_model, plain))
    run_extract(probe_config(data, probe_model, packed, compression=compression))
    with h5py.File(packed) as f:
        assert f["features"].compression == compression
    np.testing.assert_array_equal(read_cache(packed).features, read_cache(plain).features)
    with pytest.raises(ValueError, match="Received: compression='zip'"):
        run_extract(probe_config(data, probe_model, tmp_path / "x.h5", compression="zip"))


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path, probe_model, capsys):
    import os

    from pipeline.cache import CacheLock, CacheLockedError

    data = tmp_path / "data"
    write_index_images(data, 6)
    out = tmp_path / "c.h5"
    with CacheLock(out), pytest.raises(CacheLockedError, match=f'"pid": {os.getpid()}'):
        run_extract(probe_config(data, probe_model, out))
    assert not (tmp_path / "c.h5.lock").exists()
    # A lock file left by a killed run (no flock held) is stale: taken over, reported.
    (tmp_path / "c.h5.lock").write_text('{"pid": 999999, "host": "gone"}')
    assert run_extract(probe_config(data, probe_model, out)).n_rows == 6
    assert "stale lock" in capsys.readouterr().err


def kill_repeatedly(data: Path, out: Path, kills: int, seed: int) -> None:
    """SIGKILL the same extraction ``kills`` times at random points, then let it finish."""
    rng = np.random.default_rng(seed)
    for _ in range(kills):
        # Spread the kills over the whole run (243 files).
        proc = run_until_progress(extract_cmd(data, out),
                                  min_done=int(rng.integers(1, max(2, 240 // kills))))
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.kill()
        proc.communicate(timeout=60)
    final = subprocess.run(extract_cmd(data, out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr


@pytest.mark.slow  # 60 s on 2 cores; one SIGKILL mid-run stays in the default suite
def test_five_random_kills_end_in_the_uninterrupted_cache(tmp_path, resume_data):
    data, reference = resume_data
    kill_repeatedly(data, tmp_path / "c.h5", kills=5, seed=0)
    assert datasets(tmp_path / "c.h5") == datasets(reference)


@pytest.mark.slow
def test_thirty_random_kills_end_in_the_uninterrupted_cache(tmp_path, resume_data):
    data, reference = resume_data
    kill_repeatedly(data, tmp_path / "c.h5", kills=30, seed=1)
    assert datasets(tmp_path / "c.h5") == datasets(reference)


@pytest.mark.parametrize("room", ["copy fails", "append fails"])
def test_disk_full_keeps_the_previous_cache_and_says_so(tmp_path, probe_model, room):
    """A size limit (RLIMIT_FSIZE) stands in for a full disk while new images are added:
    while the cache is copied, or while rows are appended to the copy."""
    import resource

    data = tmp_path / "data"
    write_index_images(data, 30)
    out = tmp_path / "c.h5"
    run_extract(probe_config(data, probe_model, out))
    before = out.read_bytes()
    more = write_index_images(tmp_path / "more", 60)
    for rel, i in more.items():
        if i >= 30:
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path / "more" / rel, data / rel)
    # The copy is exactly len(before) bytes; any growth of it fails.
    limit = len(before) // 2 if room == "copy fails" else len(before)

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [PYTHON, str(SCRIPTS / "extract.py"), str(data), "--base", str(probe_model),
         "--pooling", "avg", "--out", str(out), "--batch-size", "4"],
        capture_output=True, text=True, preexec_fn=cap, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "reached a size limit" in last and "Free some space" in last
    assert "is unchanged" in last and "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    # A half copy holds nothing worth resuming: it is removed, and the message says so.
    assert partial_path(out).exists() == (room == "append fails")
    assert ("Committed rows are kept" in last) == (room == "append fails")
    run_extract(probe_config(data, probe_model, out))  # room again: the run completes
    check_alignment(out, more, ["a", "b", "c"])


def test_a_write_failure_is_called_a_full_disk_only_when_it_is_one(tmp_path, probe_model):
    data = tmp_path / "data"
    write_index_images(data, 3)
    (tmp_path / "notes.txt").write_text("a file where the cache's folder should be")
    with pytest.raises(CacheError) as caught:
        run_extract(probe_config(data, probe_model, tmp_path / "notes.txt" / "c.h5"))
    message = str(caught.value)
    assert message.startswith("Writing the cache failed (") and "notes.txt" in message
    assert "disk" not in message.lower() and "space" not in message.lower()


def test_decode_in_processes_gives_the_thread_cache_byte_for_byte(tmp_path, probe_model):
    """Worker processes + shared memory (the TF-free GPU box's default) change no byte."""
    data = tmp_path / "data"
    expected = write_index_images(data, 29)
    bad = bad_files(data / "b")
    caches = {}
    for decode in ("threads", "processes"):
        out = tmp_path / f"{decode}.h5"
        run_extract(probe_config(data, probe_model, out, batch_size=4, workers=2, decode=decode))
        caches[decode] = read_cache(out)
    check_alignment(tmp_path / "processes.h5", expected, ["a", "b", "c"])
    a, b = caches["threads"], caches["processes"]
    assert a.paths == b.paths and a.skipped == b.skipped and len(b.skipped) == len(bad)
    np.testing.assert_array_equal(a.features, b.features)
    with pytest.raises(ValueError, match="Received: decode='fork'"):
        run_extract(probe_config(data, probe_model, tmp_path / "x.h5", decode="fork"))


def test_decode_workers_that_cannot_start_get_a_clear_error(tmp_path):
    """Spawned workers import the main module: a script without the __main__ guard makes
    each of them try to start workers again, and they die. Say why, not BrokenProcessPool."""
    write_index_images(tmp_path / "data", 3)
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from pathlib import Path\n"
        "from pipeline.images.batches import decoded_batches\n"
        f"paths = sorted(Path({str(tmp_path / 'data')!r}).rglob('*.png'))\n"
        "for batch in decoded_batches(paths, size=(8, 8), workers=1, decode='processes'):\n"
        "    print(len(batch.indices))\n"
    )
    proc = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: A decode worker process died")
    assert "if __name__ == '__main__':" in last


def test_a_class_without_validation_images_is_warned_about(tmp_path, probe_model, caplog):
    data = tmp_path / "data"
    write_index_images(data, 12, splits=("train", "validation"))
    for image in (data / "validation" / "c").iterdir():
        image.unlink()
    with caplog.at_level("WARNING"):
        run_extract(probe_config(data, probe_model, tmp_path / "c.h5", batch_size=4))
    assert "no validation images of c: fit_head can give no score for it" in caplog.text


def test_precision_is_recorded_and_a_resume_in_another_is_refused(tmp_path):
    """--precision mixed_bfloat16 runs the base in bfloat16 and stores float32 features near
    float32's; the policy is part of the cache's identity."""
    data = tmp_path / "data"
    write_index_images(data, 6)

    def config(out: str, **kw) -> ExtractConfig:
        return ExtractConfig(str(data), "mobilenetv2", weights="none", input_size="32",
                             layer="block_2_add", batch_size=4, out=str(tmp_path / out), **kw)

    run_extract(config("f32.h5"))
    run_extract(config("bf16.h5", precision="mixed_bfloat16"))
    exact, bf16 = read_cache(tmp_path / "f32.h5"), read_cache(tmp_path / "bf16.h5")
    assert bf16.attrs["precision"] == "mixed_bfloat16" and bf16.features.dtype == np.float32
    scale = np.abs(exact.features).max()
    np.testing.assert_allclose(bf16.features, exact.features, atol=0.05 * scale)
    assert not np.array_equal(bf16.features, exact.features)
    write_index_images(data / "more", 2)  # a new class: something to append
    with pytest.raises(CacheError, match="precision: cache has 'mixed_bfloat16', this run has "
                                         "'float32'"):
        run_extract(config("bf16.h5"))
    with pytest.raises(ValueError, match=r"Received: mixed_precision=True, "
                                         r"precision='mixed_bfloat16'"):
        run_extract(config("x.h5", precision="mixed_bfloat16", mixed_precision=True))
    with pytest.raises(ValueError, match=r"Received: precision='bf16'"):
        run_extract(config("x.h5", precision="bf16"))
