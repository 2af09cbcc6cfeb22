"""pipeline.util: atomic writes leave the old file or the new one, JSON reads name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.util.files import file_sha256, read_json, replace_atomically, write_json_atomic


def test_write_json_atomic_round_trips_numpy(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(3),
                                                    "c": {3, 1}})
    assert read_json(path) == {"a": 0.5, "b": [0, 1, 2], "c": [1, 3]}
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left


def test_replace_atomically_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_text("old", encoding="utf-8")

    def fail(tmp: Path) -> None:
        assert tmp.suffix == ".keras"  # Keras saves only to names ending in .keras
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(path, fail)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_read_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="Cannot read .*bad.json"):
        read_json(bad)
    with pytest.raises(ValueError, match="Cannot read .*missing.json"):
        read_json(tmp_path / "missing.json")
    json.dumps(read_json(write_json_atomic(tmp_path / "ok.json", [1])))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))
    assert file_sha256(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
