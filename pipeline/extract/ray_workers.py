"""What runs on the Ray cluster for ``extract.py --engine ray``: decode tasks, model actors.

Ray Data calls :func:`decode_batch` as a task on blocks of the image list and
:class:`ForwardPass` as a pool of actors on batches of decoded images; each actor commits
its rows to a part of its own. The driver that lists the images, sizes the pool, runs the
pipeline and merges the parts is :mod:`pipeline.extract.ray_engine`. The fault hook
(:data:`FAULT_ENV`) kills an actor on purpose, for tests and drills.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import CacheWriter
from pipeline.extract.config import ExtractConfig
from pipeline.extract.engine import build_model, stored_features
from pipeline.images import ImageReadError, parse_size, read_image

__all__ = ["FAULT_ENV", "ForwardPass", "decode_batch", "fault_from_env", "keep_off_gpus"]

# Fault injection for tests and drills: "K:MARKER" makes a model actor die right after
# committing its K-th batch, once per MARKER file (see ForwardPass).
FAULT_ENV = "BOTTLENECK_RAY_FAULT"


def keep_off_gpus() -> None:
    """Hide the GPUs from TensorFlow in this process (the driver, a decode task).

    TensorFlow reserves most of a GPU's memory on first use; the model actors on the
    same node need it. Nothing to do without TensorFlow, or once it is initialised.
    """
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except (ImportError, RuntimeError):
        pass


def decode_batch(batch: dict[str, np.ndarray], *, size: tuple[int, int],
                 interpolation: str, jpeg_downscale: str = "off") -> dict[str, np.ndarray]:
    """A Ray Data task: decode and resize every listed image with the local engine's
    :func:`~pipeline.images.read_image`; an unreadable file gets ``ok=False`` and its reason.
    """
    keep_off_gpus()
    n = len(batch["path"])
    images = np.zeros((n, *size, 3), np.float32)
    digests, errors, ok = [""] * n, [""] * n, np.zeros(n, dtype=bool)
    for i, path in enumerate(batch["path"]):
        try:
            images[i], digests[i] = read_image(path, size, interpolation,
                                               jpeg_downscale=jpeg_downscale)
            ok[i] = True
        except ImageReadError as exc:
            errors[i] = str(exc)
    return {**batch, "image": images, "sha256": np.array(digests, dtype=object),
            "error": np.array(errors, dtype=object), "ok": ok}


class ForwardPass:
    """A Ray Data actor: builds the base once, then runs each batch's readable images
    through it and commits their rows, and the batch's unreadable files, to its own part.

    Args:
        config: the run's arguments; the base is built from them as by the local engine.
        folder: the parts folder, on a filesystem every node and the driver share.
        attrs: the part's attributes (the cache's, plus ``part_of``, ``listing``,
            ``n_images``).
        fault: ``(K, MARKER)`` from :data:`FAULT_ENV`: die right after committing the
            K-th batch, before Ray has its result, unless MARKER exists (created first,
            so once per run). Ray then restarts the actor and retries the batch, which
            ends up in two parts.
    """

    def __init__(self, config: ExtractConfig, folder: str, attrs: dict[str, Any],
                 fault: tuple[int, str] | None = None) -> None:
        if 0 < config.gpus_per_worker < 1:
            _share_gpu()
        self.config = config
        self.model = build_model(config, parse_size(config.input_size))
        self.attrs = attrs
        self.fault = fault
        self.batches = 0
        # A new part per actor incarnation: a restarted actor never appends to a file its
        # predecessor may have left damaged.
        self.part = Path(folder) / (f"part-{socket.gethostname()}-{os.getpid()}-"
                                    f"{uuid.uuid4().hex[:8]}.h5")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Extract one batch, commit it to the part; return the batch's positions."""
        ok = np.asarray(batch["ok"], dtype=bool)
        bad = ~ok
        # Each image in the forward batch and slot of its position in the folder's list,
        # as the local engine computes it: the merged cache equals its cache byte for byte.
        first, *extra = [stored_features(x, self.config.dtype) for x in
                         self.model.all_features(batch["image"][ok], batch["index"][ok])]
        skipped = [(str(p), str(reason), int(size), int(mtime)) for p, reason, size, mtime in
                   zip(batch["rel"][bad], batch["error"][bad], batch["size"][bad],
                       batch["mtime_ns"][bad], strict=True)]
        if self.batches:
            writer = CacheWriter.resume(self.part)
        else:
            shapes = self.model.feature_shapes
            writer = CacheWriter.create(self.part, attrs=self.attrs, feature_shape=shapes[0],
                                        dtype=self.config.dtype,
                                        compression=self.config.compression,
                                        extra_shapes=shapes[1:])
        try:  # closed after every batch: the driver reads the parts when Ray is done
            writer.append(
                first, batch["label"][ok], [str(p) for p in batch["rel"][ok]],
                [str(s) for s in batch["split"][ok]], skipped,
                sha256=[str(d) for d in batch["sha256"][ok]], size=batch["size"][ok],
                mtime_ns=batch["mtime_ns"][ok], extra=extra, index=batch["index"][ok],
                skipped_index=batch["index"][bad],
            )
        finally:
            writer.close()
        self.batches += 1
        if self.fault and self.batches == self.fault[0] and _claim(self.fault[1]):
            os._exit(1)  # a crash as abrupt as a lost node: no cleanup, no reply to Ray
        return {"index": batch["index"]}


def _claim(marker: str) -> bool:
    """Create ``marker``; False if it exists (another actor, or a retry, was first)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fault_from_env() -> tuple[int, str] | None:
    """:data:`FAULT_ENV` ("K:MARKER") parsed.

    Raises:
        ValueError: set, but not of that form.
    """
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    k, _, marker = value.partition(":")
    if not (k.isdigit() and int(k) > 0 and marker):
        raise ValueError(f"{FAULT_ENV} must be K:MARKER (K >= 1, MARKER a file path). "
                         f"Received: {FAULT_ENV}={value!r}")
    return int(k), marker


def _share_gpu() -> None:
    """Several actors on one GPU (fractional --gpus-per-worker): each TensorFlow takes GPU
    memory as it needs it instead of most of it at once."""
    try:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except (ImportError, RuntimeError):
        pass
