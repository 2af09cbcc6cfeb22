"""The history of compare runs: one JSON line per run, listed by ``compare.py --history``.

Each line summarises one ``results`` dict (see :mod:`pipeline.compare.report`): where it
was written, what was compared, the best pair and its accuracy, so past runs can be
found and set side by side without opening their report folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.compare.report import markdown_table, number_cell

__all__ = ["append_history", "format_history", "history_entry", "read_history"]


def history_entry(results: dict[str, Any]) -> dict[str, Any]:
    """The one-line summary of a run that goes into the history file.

    Args:
        results: a compare ``results`` dict.

    Returns:
        JSON-safe dict: time, out, caches, heads, cv, protocol, sweep, seed, row counts, best pair,
        its parameters and accuracies, and how many pairs were scored and skipped.
    """
    config = results["config"]
    top = results["leaderboard"][0] if results["leaderboard"] else None
    return {
        "time": results["started"],
        "out": results["out_dir"],
        "caches": config["caches"],
        "heads": config["heads"],
        "scratch": config["scratch"],
        "cv": config["cv"],
        # "validation" (the recorded split) or "cv"; older lines have none (they are "cv").
        "protocol": results.get("protocol_kind", "cv"),
        "sweep": config["sweep"],
        "seed": config["seed"],
        "n_pool": results["n_pool"],
        "n_test": results["n_test"],
        "best": None if top is None else f"{top.get('label') or top['base']} / {top['head']}",
        "best_params": None if top is None else top["params"],
        "top_accuracy": None if top is None else top["accuracy_mean"],
        "top_accuracy_std": None if top is None else top["accuracy_std"],
        "test_accuracy": None if top is None else top["test_accuracy"],
        "n_scored": len(results["leaderboard"]),
        "n_skipped": len(results["skipped"]),
    }


def append_history(path: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Append one JSON line to the history file (created with its folder if missing).

    Args:
        path: the history file, e.g. ``reports/history.jsonl``.
        entry: from :func:`history_entry`.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line in append mode: runs that finish together do not interleave.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    return path


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run recorded in a history file, oldest first; [] when there is none.

    A line that is not a JSON object (a run killed mid-write) is passed over.

    Args:
        path: the history file.

    Returns:
        The entries.
    """
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def format_history(entries: Sequence[dict[str, Any]]) -> str:
    """The history as a Markdown table, one row per run, oldest first.

    Args:
        entries: from :func:`read_history`.

    Returns:
        The table, or a one-line note when there are no runs.
    """
    if not entries:
        return "No compare runs recorded yet."
    header = ["time", "caches", "heads", "folds", "sweep", "best pair", "accuracy", "test", "out"]
    rows = []
    for e in entries:
        accuracy = "—"
        if e.get("top_accuracy") is not None:
            accuracy = f"{e['top_accuracy']:.4f}"
            if e.get("protocol") != "validation":
                accuracy += f" ± {e.get('top_accuracy_std') or 0:.4f}"
        rows.append([
            str(e.get("time", "?")),
            ", ".join(Path(c).name for c in e.get("caches", [])),
            ",".join(e.get("heads", [])) + (" +scratch" if e.get("scratch") else ""),
            "split" if e.get("protocol") == "validation" else str(e.get("cv", "?")),
            "yes" if e.get("sweep") else "no",
            e.get("best") or "nothing ran",
            accuracy,
            number_cell(e.get("test_accuracy")),
            str(e.get("out", "?")),
        ])
    return markdown_table(header, rows, align="lllrlllrl")
