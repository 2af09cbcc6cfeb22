"""Finished fits kept on disk, so an interrupted compare run continues where it stopped.

Every fit (a pair's head at one grid point on one fold, or its test refit) is appended as
one JSON line to ``<report folder's parent>/compare-unfinished-<run key>.jsonl`` the moment
it ends. Running the same command again reads the file and fits only what is missing; the
file is removed once the report is written. Each line is keyed by everything its result
depends on (the cache file's identity, the layer, the head, its parameters, the exact rows
fitted and scored, seed, epochs, class weights), so a run with other settings, or on a
cache changed since, never reuses a stale result: its key differs and it is fitted again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FitStore", "data_identity", "fit_key", "store_path"]

# Bumped when a stored result's meaning changes, so older lines are never read as new.
_STORE_VERSION = 1


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_identity(path: str | os.PathLike, layer: str | None) -> dict[str, Any]:
    """What identifies one compared cache's features without reading them all.

    Args:
        path: the cache file (or the scratch row's image folder).
        layer: the stored layer read, or None.

    Returns:
        Its resolved path, size and modification time (an extract that adds rows, or a
        re-extraction, changes them), and the layer.
    """
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "layer": layer}


def fit_key(
    *,
    data: dict[str, Any],
    head: str,
    params: dict[str, Any],
    fit_rows: np.ndarray,
    score_rows: np.ndarray,
    settings: dict[str, Any],
) -> str:
    """The key of one fit: a hash of everything its result depends on.

    Args:
        data: the features' identity (:func:`data_identity`).
        head: the head's name.
        params: its ``set_params`` overrides (the grid point).
        fit_rows: the rows it is fitted on.
        score_rows: the rows it predicts.
        settings: the run's settings that reach every fit (seed, epochs, class weights).

    Returns:
        A hex digest.
    """
    rows = [hashlib.sha256(np.asarray(r, dtype=np.int64).tobytes()).hexdigest()
            for r in (fit_rows, score_rows)]
    return _digest({"version": _STORE_VERSION, "data": data, "head": head, "params": params,
                    "rows": rows, "settings": settings})


def store_path(out_dir: Path, run: dict[str, Any]) -> Path:
    """Where a run keeps its finished fits: beside its report folder, named by its settings.

    Beside, not inside: the default report folder is named by the time the run started,
    so the same command run again writes another folder, yet finds the same store.

    Args:
        out_dir: the report folder.
        run: what makes two runs the same command (caches, heads, folds, settings).

    Returns:
        The JSON-lines file's path.
    """
    return out_dir.parent / f"compare-unfinished-{_digest(run)[:16]}.jsonl"


class FitStore:
    """Finished fits of one run, read from and appended to a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}
        self.reused = 0  # fits this run took from the store instead of fitting them
        self._file: Any = None

    def load(self) -> int:
        """Read the fits a stopped run kept; a line cut short by a kill is passed over.

        Returns:
            How many fits were read.
        """
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    key, result = entry["key"], entry["result"]
                except (ValueError, KeyError, TypeError):
                    continue
                if "pred" in result:
                    result["pred"] = np.asarray(result["pred"], dtype=np.int64)
                self.results[key] = result
        return len(self.results)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of the fit ``key``, or None."""
        result = self.results.get(key)
        self.reused += result is not None
        return result

    def add(self, key: str, result: dict[str, Any]) -> None:
        """Append one finished fit (flushed at once: Ctrl-C or a kill keeps it)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
            # A line a kill cut short gets its end, so the next line stays whole.
            if self._file.tell() and not self._ends_line():
                self._file.write("\n")
        line = {"key": key, "result": {
            k: (np.asarray(v).tolist() if k == "pred" else v) for k, v in result.items()
        }}
        # One write per line: a line is whole or, after a kill mid-write, skipped by load.
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.results[key] = result

    def _ends_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def close(self) -> None:
        """Close the file (it stays on disk for the next run)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Delete the file: the run finished and its report holds every result."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.results)

