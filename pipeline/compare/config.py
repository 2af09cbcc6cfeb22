"""What a compare run is asked (``CompareConfig``, checked up front) and what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.heads import HEADS

__all__ = [
    "COMPARE_HEADS",
    "SCRATCH_HEAD",
    "CompareConfig",
    "CompareResult",
    "check_config",
    "default_out",
]

# The default line-up: cheapest first; the dense head last because it is the slowest.
COMPARE_HEADS = ("logreg", "linear-svm", "svm", "knn", "dense")
# The --scratch row's head name: the demo's convnet trained from random weights on images.
SCRATCH_HEAD = "convnet"


@dataclass
class CompareConfig:
    """Arguments of the compare command, saved in ``results.json`` beside the leaderboard."""

    caches: list[str]
    heads: list[str] = field(default_factory=lambda: list(COMPARE_HEADS))
    cv: int = 5
    sweep: bool = False
    n_jobs: int = 1
    seed: int = 0
    scratch: str | None = None  # DATA_DIR of the cached images: adds the from-scratch row
    out: str | None = None  # default: reports/compare-<timestamp>
    history_file: str = "reports/history.jsonl"
    layers: str | None = None  # "a,b" or "all": stored layers side by side, as bases are
    epochs: int = 100  # dense head: maximum epochs (early stopping decides)
    scratch_epochs: int = 50  # scratch convnet: maximum epochs (early stopping decides)
    class_weight: str | None = None  # "balanced": every head that weights classes (not knn)


@dataclass
class CompareResult:
    """What :func:`run_compare` did: the leaderboard rows, skipped pairs and output files."""

    out_dir: Path
    leaderboard: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    n_pool: int
    n_test: int
    outputs: dict[str, Path]
    seconds: float
    protocol: str = ""  # which rows were fitted and scored, in plain words
    n_reused: int = 0  # fits a stopped run had kept, not fitted again

    def summary(self) -> str:
        """One line: what happened and where the outputs are."""
        if not self.leaderboard:
            reasons = {s["reason"] for s in self.skipped}
            if len(reasons) == 1:  # e.g. the pool cannot be folded: say it once
                why = f"every pair: {reasons.pop()}"
            else:
                why = "; ".join(f"{s['label']} / {s['head']}: {s['reason']}" for s in self.skipped)
            return f"compare: nothing could run ({why}). Report in {self.out_dir}/"
        best = self.leaderboard[0]
        test = (
            f", test {best['test_accuracy']:.4f}"
            if best.get("test_accuracy") is not None
            else ""
        )
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        reused = (f" ({self.n_reused} fits kept from a stopped run)" if self.n_reused else "")
        accuracy = f"{best['accuracy_mean']:.4f}"
        if best["n_folds"] > 1:
            accuracy += f" ± {best['accuracy_std']:.4f}"
        return (
            f"compare: done in {self.seconds:.0f} s{reused}. {len(self.leaderboard)} pairs "
            f"scored{skipped} ({self.protocol}). Best {best['label']} / {best['head']} "
            f"({best['params'] or 'defaults'}): accuracy {accuracy}{test}. "
            f"Leaderboard and report.html in {self.out_dir}/"
        )


def check_config(config: CompareConfig) -> None:
    """Keras-style errors for every bad argument, before any file is read.

    Args:
        config: the arguments to check.

    Raises:
        ValueError: no cache, an unknown or repeated head, or a bad ``cv``, ``n_jobs``,
            ``epochs``, ``scratch_epochs`` or ``class_weight``.
        FileNotFoundError: a cache or the scratch folder does not exist.
    """
    if not config.caches:
        raise ValueError("Give at least one cache. Received: caches=[]")
    if not config.heads or any(h not in HEADS for h in config.heads):
        unknown = [h for h in config.heads if h not in HEADS]
        raise ValueError(
            f"`heads` must be a comma-separated list of {', '.join(HEADS)}"
            + (f"; {', '.join(unknown)} is none of them" if unknown else "")
            + f". Received: heads={','.join(config.heads)!r}"
        )
    if len(set(config.heads)) != len(config.heads):
        raise ValueError(f"`heads` lists a head twice. Received: heads={config.heads}")
    if not isinstance(config.cv, int) or config.cv < 2:
        raise ValueError(f"`cv` must be an integer >= 2. Received: cv={config.cv!r}")
    if not isinstance(config.n_jobs, int) or config.n_jobs == 0:
        raise ValueError(
            "`n_jobs` must be a non-zero integer (-1: all cores). "
            f"Received: n_jobs={config.n_jobs!r}"
        )
    for name in ("epochs", "scratch_epochs"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    if config.class_weight not in (None, "balanced"):
        raise ValueError(
            "`--class-weight` must be none or balanced. "
            f"Received: --class-weight={config.class_weight}"
        )
    for path in config.caches:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Cache file not found. Received: cache={path}")
    if config.scratch is not None and not Path(config.scratch).is_dir():
        raise FileNotFoundError(
            f"`scratch` must be the folder of the cached images. Received: scratch={config.scratch}"
        )


def default_out(now: datetime) -> Path:
    """The report folder when ``out`` is not given: ``reports/compare-<timestamp>``.

    Args:
        now: the run's start time.

    Returns:
        The folder path (not created).
    """
    return Path("reports") / f"compare-{now.strftime('%Y%m%d-%H%M%S')}"
