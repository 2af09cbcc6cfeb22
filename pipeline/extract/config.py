"""What ``extract.py`` is asked, checked before anything heavy; what a run did."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.augment import AugmentSpec
from pipeline.bases import PRECISIONS, check_pooling, check_preprocess
from pipeline.images import check_interpolation, check_jpeg_downscale, is_manifest, parse_size
from pipeline.images.batches import check_decode
from pipeline.progress import format_duration

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "ENGINES",
    "ExtractConfig",
    "ExtractResult",
    "default_out",
    "is_file_base",
    "parse_shard",
    "shard_slice",
    "validate",
]


DTYPES = ("float32", "float16")


COMPRESSIONS = ("none", "lzf", "gzip")


ENGINES = ("local", "ray")


# --fold-batchnorm: on folds frozen BatchNormalization into the layer before it (faster,
# features equal the plain pass up to float rounding); off runs the plain pass.
FOLD_MODES = ("on", "off")


@dataclass
class ExtractConfig:
    """Everything ``extract.py`` was asked; saved in the cache's ``config`` attribute."""

    data_dir: str
    base: str
    weights: str | None = None
    input_size: str | None = None
    layer: str | None = None
    pooling: str = "avg"
    preprocess: str | None = None
    interpolation: str = "bilinear"
    jpeg_downscale: str = "off"  # "dct": large JPEGs reduced in the DCT domain (not Keras')
    batch_size: int = 32
    dtype: str = "float32"
    out: str | None = None
    seed: int = 0
    workers: int = 0  # decode workers; with engine="ray", model actors (0: auto)
    decode: str = "auto"  # threads | processes | auto (processes on >= 4 cores, else threads)
    log_every: float = 30.0
    compression: str = "none"
    shard: str | None = None  # "i/N": this process extracts the i-th of N contiguous slices
    mixed_precision: bool = False  # the GPU box's shorthand for precision="mixed_float16"
    precision: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    jit: str = "auto"
    fold_batchnorm: str = "on"  # on: BatchNormalization folded into the layer before it
    augment: int = 0
    augment_flip: str = "horizontal"
    augment_rotation: float = 0.05
    augment_zoom: float = 0.1
    augment_translation: float = 0.1
    engine: str = "local"  # "ray": the forward pass runs on a Ray cluster (ray_engine.py)
    address: str | None = None  # Ray cluster: "auto", "ray://host:10001"; None starts one
    gpus_per_worker: float = 0.0  # GPUs per Ray model actor (0: CPU)

    def augment_spec(self) -> AugmentSpec:
        """The augmentation of ``--augment`` passes (validated)."""
        return AugmentSpec(self.augment_flip, self.augment_rotation, self.augment_zoom,
                           self.augment_translation)


@dataclass
class ExtractResult:
    """What one extraction run did."""

    path: Path
    status: str  # "extracted" or "up-to-date"
    n_rows: int
    n_new_rows: int
    n_skipped: int
    new_skipped: list[tuple[str, str]] = field(default_factory=list)
    feature_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    seconds: float = 0.0
    changes: dict[str, int] = field(default_factory=dict)
    n_new_augmented: int = 0  # augmented copies (--augment) this run added

    def summary(self) -> str:
        """The one-line summary printed last."""
        if self.status == "up-to-date":
            return (
                f"extract: up to date, nothing to do: {self.path} already holds all "
                f"{self.n_rows} images ({self.n_skipped} skipped)."
            )
        size_mb = self.path.stat().st_size / 1e6
        # Augmented copies are forward passes too: an --augment run on an existing cache
        # adds only those, and "0 new images" alone would hide them.
        done = self.n_new_rows + self.n_new_augmented
        rate = done / self.seconds if self.seconds > 0 else 0.0
        copies = (f" and {self.n_new_augmented} augmented copies" if self.n_new_augmented
                  else "")
        return (
            f"extract: done. {self.n_new_rows} new images{copies} in "
            f"{format_duration(self.seconds)} ({rate:.1f} img/s); cache {self.path}: "
            f"{self.n_rows} rows, features {self.feature_shape} {self.dtype}, "
            f"{size_mb:.1f} MB, {self.n_skipped} skipped"
            + "".join(f", {v} {k.replace('_', ' ')}" for k, v in self.changes.items() if v)
            + "."
        )


def validate(config: ExtractConfig) -> tuple[int, int] | None:
    """Check every argument before anything heavy happens; return the parsed input size."""
    check_pooling(config.pooling)
    if config.preprocess is not None:
        check_preprocess(config.preprocess)
    check_interpolation(config.interpolation)
    check_jpeg_downscale(config.jpeg_downscale)
    if config.dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}. Received: dtype={config.dtype!r}")
    if config.batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={config.batch_size}")
    if config.workers < 0:
        raise ValueError(f"`workers` must be >= 0 (0: auto). Received: workers={config.workers}")
    if config.compression not in COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {COMPRESSIONS}. "
                         f"Received: compression={config.compression!r}")
    if config.augment < 0:
        raise ValueError(f"`augment` must be >= 0. Received: augment={config.augment}")
    config.augment_spec()
    parse_shard(config.shard)
    if config.log_every <= 0:
        raise ValueError(f"`log_every` must be > 0. Received: log_every={config.log_every}")
    check_decode(config.decode)
    policy(config)
    if config.fold_batchnorm not in FOLD_MODES:
        raise ValueError(f"`fold_batchnorm` must be one of {FOLD_MODES}. "
                         f"Received: fold_batchnorm={config.fold_batchnorm!r}")
    if config.engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}. Received: engine={config.engine!r}")
    # engine='ray' arguments are checked by ray_engine.check_ray_config (run_extract).
    if config.engine != "ray" and (config.address is not None or config.gpus_per_worker):
        raise ValueError(
            "`address` and `gpus_per_worker` apply to engine='ray'. Received: engine='local', "
            f"address={config.address!r}, gpus_per_worker={config.gpus_per_worker}"
        )
    return parse_size(config.input_size)


def policy(config: ExtractConfig) -> str:
    """The Keras dtype policy the base runs in: ``precision``, or mixed_float16 for
    ``mixed_precision``.

    Raises:
        ValueError: an unknown precision, or mixed_precision with another precision.
    """
    if config.precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}. "
                         f"Received: precision={config.precision!r}")
    if config.mixed_precision and config.precision not in ("float32", "mixed_float16"):
        raise ValueError(
            "`mixed_precision` means `precision`='mixed_float16': give one of them. "
            f"Received: mixed_precision=True, precision={config.precision!r}")
    return "mixed_float16" if config.mixed_precision else config.precision


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard i/N`` -> (i, N) with 0 <= i < N.

    Raises:
        ValueError: not of that form.
    """
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(
            f"`shard` must be i/N with 0 <= i < N (e.g. 0/4). Received: shard={value!r}"
        )
    return i, n


def shard_slice(n_records: int, shard: tuple[int, int], batch_size: int = 1) -> slice:
    """Contiguous slice i of N: parts concatenated in order give the single-process order.

    Slices split the list between forward batches (multiples of ``batch_size``), so each
    image is computed in the batch a single process would put it in: merged shards equal
    the single-process cache byte for byte.
    """
    i, n = shard
    batches = -(-n_records // batch_size)
    return slice(min(n_records, i * batches // n * batch_size),
                 min(n_records, (i + 1) * batches // n * batch_size))


def default_out(config: ExtractConfig, input_size: tuple[int, int]) -> Path:
    """``cache/<data>-<base>-<HxW>-<layer|top>[-random]-<pooling>.h5``: one file per setup.

    ``<data>`` is the folder's name; for a manifest, its folder's name and its own stem
    (``kaggle/LABELS.csv`` -> ``kaggle-LABELS``), so two manifests of one folder (a train
    and a test list) get two caches. Built from the arguments alone (no model needed), so
    an up-to-date check can find the cache before paying for building the base.
    """
    base = _base_name(config.base)
    h, w = input_size
    layer = (config.layer or "top").replace(",", "+")
    data = Path(config.data_dir).resolve()
    name = f"{data.parent.name}-{data.stem}" if is_manifest(data) else data.name
    parts = [name, base.lower(), f"{h}x{w}", layer]
    if config.weights == "none":
        parts.append("random")
    parts.append(config.pooling)
    name = "-".join(parts)
    if config.shard:
        i, n = parse_shard(config.shard)
        name += f".part-{i}-of-{n}"
    return Path("cache") / (name + ".h5")


def _base_name(base: str) -> str:
    """``--base`` as a file-name part: a file's stem, a preset folder's name, a keras-hub
    handle without its scheme (``hf://keras/dinov2_small`` -> ``keras_dinov2_small``)."""
    if is_file_base(base):
        return Path(base).stem
    if "://" in base or base.startswith("hub:"):
        handle = base.removeprefix("hub:").split("://", 1)[-1]
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", handle).strip("_")
    return Path(base).name if Path(base).is_dir() else base


def is_file_base(base: str) -> bool:
    return base.endswith((".keras", ".h5")) or Path(base).is_file()
