"""--engine ray on a local 2-CPU Ray cluster: the same cache as one process, through
decode tasks, an actor pool, per-actor parts, a killed actor and a resume."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import bad_files, save_png, write_index_images

from pipeline.cache import read_row_state
from pipeline.cli import extract_main
from pipeline.extract import ExtractConfig, run_extract
from pipeline.extract import ray_engine as scale
from pipeline.extract.ray_workers import FAULT_ENV

ray = pytest.importorskip("ray", reason="the Ray engine is the optional extra .[ray]")

# Every per-row and skipped dataset of a cache: equal datasets mean an equal cache.
DATASETS = ("features", "labels", "paths", "split", "sha256", "size", "mtime_ns",
            "skipped/paths", "skipped/reasons", "skipped/size", "skipped/mtime_ns")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """23 index-encoding images in train/validation, unreadable files between them."""
    root = tmp_path_factory.mktemp("ray") / "data"
    write_index_images(root, 23, splits=("train", "validation"))
    bad_files(root / "train" / "b")  # after b's images, before c's
    (root / "validation" / "a" / "img0000x.png").write_bytes(b"\x89PNG broken")
    return root


def config(data: Path, base: Path | str, out: Path, **kw) -> ExtractConfig:
    if str(base).endswith(".keras"):
        kw = {"pooling": "avg", "preprocess": "none", **kw}
    return ExtractConfig(str(data), str(base), out=str(out), batch_size=4, **kw)


def contents(path: Path) -> dict[str, bytes]:
    """Each dataset's raw bytes (strings joined): byte-for-byte comparison, in row order."""
    with h5py.File(path, "r") as f:
        out = {}
        for name in DATASETS:
            ds = f[name]
            out[name] = ("\0".join(ds.asstr()[:]).encode() if h5py.check_string_dtype(ds.dtype)
                         else ds[:].tobytes())
        return out


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    for name in DATASETS:
        assert ca[name] == cb[name], f"{name} differs between {a.name} and {b.name}"


def test_merged_cache_equals_single_process_cache(cluster, data, tmp_path):
    """Rows, order, features of a real conv net (whose float results would change with
    the batch a row runs in), hashes and skipped files: all equal, byte for byte."""
    extra = {"weights": "none", "input_size": "32", "seed": 3}
    base = "mobilenetv2"
    single, merged = tmp_path / "single.h5", tmp_path / "ray.h5"
    run_extract(config(data, base, single, **extra))
    result = run_extract(config(data, base, merged, engine="ray", **extra))
    assert result.status == "extracted" and result.n_skipped == 4
    assert_same_cache(single, merged)
    assert not scale.parts_folder(merged).exists(), "parts are deleted once merged"
    again = run_extract(config(data, base, merged, engine="ray", **extra))
    assert again.status == "up-to-date"


def test_killed_actor_is_retried_no_duplicate_no_missing_row(cluster, data, probe_model,
                                                             tmp_path, monkeypatch, capsys):
    """An actor dies right after committing its 2nd batch; Ray restarts it and retries the
    batch, which is then in two parts: the merge keeps it once. --merge of the parts folder
    gives the same cache, and refuses once a part is gone."""
    single, merged = tmp_path / "single.h5", tmp_path / "ray.h5"
    run_extract(config(data, probe_model, single))
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")
    monkeypatch.setattr(scale, "_remove_parts", lambda folder: None)
    run_extract(config(data, probe_model, merged, engine="ray"))
    assert marker.exists(), "the fault hook did not fire"
    assert_same_cache(single, merged)
    folder = scale.parts_folder(merged)
    parts = sorted(folder.glob("part-*.h5.partial"))
    states = [read_row_state(p) for p in parts]
    entries = [i for s in states for i in [*s.index.tolist(), *s.skipped_index.tolist()]]
    assert len(parts) >= 2 and len(entries) > len(set(entries)) == 27, "no retried batch?"

    copy = tmp_path / "merged.h5"
    assert extract_main(["--merge", str(folder), "--out", str(copy)]) == 0
    assert_same_cache(single, copy)
    max(parts, key=lambda p: p.stat().st_size).unlink()
    capsys.readouterr()
    assert extract_main(["--merge", str(folder), "--out", str(copy)]) == 2
    assert "images are in none of the" in capsys.readouterr().err


def test_resume_extracts_only_what_no_part_holds(cluster, probe_model, tmp_path,
                                                 monkeypatch, capsys):
    """Parts of an unfinished run are reused, even after the folder changed: only new and
    changed images are extracted again, and the cache equals a fresh single-process one."""
    data = tmp_path / "data"
    write_index_images(data, 15)
    monkeypatch.setattr(scale, "_remove_parts", lambda folder: None)
    out = tmp_path / "ray.h5"
    run_extract(config(data, probe_model, out, engine="ray"))
    folder = scale.parts_folder(out)
    first_parts = set(folder.glob("part-*"))
    out.unlink()  # as if the driver died after Ray finished: only the parts are left
    for i in range(15, 23):  # images added between the two runs, some sorted in between
        save_png(np.full((6, 9, 3), (i, 0, 47), np.uint8), data / "b" / f"img{i - 14:04d}x.png")
    save_png(np.full((7, 7, 3), 200, np.uint8), data / "a" / "img0000.png")  # changed
    capsys.readouterr()
    run_extract(config(data, probe_model, out, engine="ray"))
    assert "14 of the 23 images are already in" in capsys.readouterr().err
    new_parts = set(folder.glob("part-*")) - first_parts
    assert sum(s.index.size for s in map(read_row_state, new_parts)) == 9
    fresh = tmp_path / "single.h5"
    run_extract(config(data, probe_model, fresh))
    assert_same_cache(fresh, out)
    assert extract_main(["--merge", str(folder), "--out", str(tmp_path / "m.h5")]) == 2
    assert "another image list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "spark"], "`--engine` must be one of local, ray. Received: --engine="),
        (["--address", "auto"], "apply to engine='ray'. Received: --engine='local', --address="),
        (["--engine", "ray", "--address", "nowhere"], "Received: --address='nowhere'"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "Received: --gpus-per-worker=-1"),
        (["--engine", "ray", "--shard", "0/2"], "Received: --shard='0/2', --engine='ray'"),
        (["--engine", "ray", "--augment", "2"], "--engine local --augment K"),
    ],
)
def test_bad_arguments(data, probe_model, tmp_path, capsys, args, message):
    out = tmp_path / "c.h5"
    assert extract_main([str(data), "--base", str(probe_model), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists() and not scale.parts_folder(out).exists()


def test_bad_cluster_and_missing_ray(cluster, data, probe_model, tmp_path, capsys,
                                     monkeypatch):
    args = [str(data), "--base", str(probe_model), "--out", str(tmp_path / "c.h5"),
            "--engine", "ray"]
    assert extract_main([*args, "--workers", "2"]) == 2  # 2 CPUs: one must decode
    assert "cannot run 2 model actors" in capsys.readouterr().err
    monkeypatch.setenv(FAULT_ENV, "soon")
    assert extract_main(args) == 2
    assert f"Received: {FAULT_ENV}='soon'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert extract_main(args) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_actor_count_and_block_rows():
    assert scale.actor_count(0, 1, cpus=64, gpus=8, nodes=2) == 8
    assert scale.actor_count(0, 0.5, cpus=64, gpus=8, nodes=2) == 16
    assert scale.actor_count(0, 0, cpus=32, gpus=0, nodes=2) == 2
    assert scale.actor_count(0, 0, cpus=2, gpus=0, nodes=1) == 1
    assert scale.actor_count(3, 1, cpus=64, gpus=8, nodes=2) == 3
    for workers, gpus_per_worker, cpus, gpus in [(0, 1, 8, 0), (9, 1, 64, 8), (0, 0, 1, 0)]:
        with pytest.raises(ValueError, match="Received: workers="):
            scale.actor_count(workers, gpus_per_worker, cpus=cpus, gpus=gpus, nodes=1)
    assert scale.block_rows(32, (224, 224)) == 96  # ~64 MiB of pixels, whole batches
    assert scale.block_rows(4, (8, 8)) == 1024
    assert scale.block_rows(64, (1024, 1024)) == 64  # at least one batch


def test_jpeg_downscale_reaches_the_decode_tasks(cluster, probe_model, tmp_path):
    """--jpeg-downscale dct on Ray: the local engine's cache, byte for byte (and not off's)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(6):
        folder = tmp_path / "data" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", quality=90)
    data = tmp_path / "data"
    local, on_ray, off = tmp_path / "local.h5", tmp_path / "ray.h5", tmp_path / "off.h5"
    run_extract(config(data, probe_model, local, jpeg_downscale="dct"))
    run_extract(config(data, probe_model, on_ray, jpeg_downscale="dct", engine="ray"))
    run_extract(config(data, probe_model, off))
    assert_same_cache(local, on_ray)
    assert contents(local)["features"] != contents(off)["features"]
