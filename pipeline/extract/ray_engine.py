"""The same extraction on a Ray cluster (``extract.py --engine ray``), merged into one cache.

    image list --Ray Data blocks--> decode tasks: pipeline.images.read_image (pixels, sha256)
        --map_batches, actor pool--> model actors: extract.build_model once per actor,
                                     FeatureModel.all_features per batch, rows committed
                                     to the actor's own part through CacheWriter
        <out>.parts/part-*.h5.partial --driver, in image-list order--> <out>

The driver is ``run_extract`` itself: it lists the folder, holds the cache lock, creates,
resumes or appends to the cache and finishes it exactly as the local engine does; only
the decoding and forward pass of the images still to do run on the cluster
(:func:`extract_on_ray` stands in for the local decode/forward loop). So rows land in
single-process order, and skipped files, changed files, "up to date" and the final
summary behave as locally; fit_head, compare and predict read the result unchanged.

A part is a cache of the same schema plus each row's position in the image list
(``index``), written by one actor only and committed batch by batch: an actor that dies
loses at most its batch in flight, and a batch Ray retried after its actor died after
writing it is in two parts and kept once. Parts outlive a failed or interrupted run, so
the same command resumes from them; they are deleted once their rows are committed to the
cache. ``extract.py --merge <out>.parts --out FILE`` merges them without a driver.

This module is the driver's side (checks, pool size, parts, the pipeline, the merge); the
decode tasks and model actors that run on the cluster are :mod:`pipeline.extract.ray_workers`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.bases import FeatureModel
from pipeline.cache import (
    CacheError,
    CacheWriter,
    copy_rows,
    identity_differences,
    read_attrs,
    read_row_state,
)
from pipeline.extract.config import ExtractConfig
from pipeline.extract.engine import stopped
from pipeline.extract.ray_workers import ForwardPass, decode_batch, fault_from_env
from pipeline.images import ImageIndex, ImageRecord
from pipeline.interrupts import install_sigterm, restore_sigterm
from pipeline.progress import Progress

__all__ = [
    "actor_count",
    "block_rows",
    "check_ray_config",
    "extract_on_ray",
    "parts_folder",
]

log = logging.getLogger(__name__)

# Attributes about one file's bookkeeping, not about what its features mean.
_BOOKKEEPING = ("complete", "created", "n_rows", "n_skipped", "n_augmented", "schema_version",
                "compression", "leaks", "augment", "augment_passes")


class _Entry(NamedTuple):
    """Where a part holds an image: its row, or (``reason`` set) its skipped entry."""

    part: Path
    position: int
    reason: str | None


def check_ray_config(config: ExtractConfig) -> None:
    """Refuse ``--engine ray`` arguments that cannot work, before anything heavy happens.

    Raises:
        ValueError: Ray is not installed, a bad address or GPU count, or an option the
            Ray engine does not distribute (``--shard``, ``--augment``).
    """
    try:
        import ray.data  # noqa: F401 - only whether it imports
    except ImportError:
        raise ValueError(
            "`engine='ray'` needs Ray Data: pip install -e \".[ray]\" (ray[data]>=2.40). "
            "Received: engine='ray'"
        ) from None
    address = config.address
    if address is not None and not (
        address == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", address)
    ):
        raise ValueError(
            "`address` must be 'auto', 'ray://HOST:PORT' (Ray client) or 'HOST:PORT' (the "
            f"head node's GCS). Received: address={address!r}"
        )
    if not config.gpus_per_worker >= 0:
        raise ValueError(
            f"`gpus_per_worker` must be >= 0 (0: CPU). Received: "
            f"gpus_per_worker={config.gpus_per_worker}"
        )
    if config.shard is not None:
        raise ValueError(
            "`shard` splits the images by hand for the local engine; engine='ray' spreads "
            f"them itself. Received: shard={config.shard!r}, engine='ray'"
        )
    if config.augment:
        raise ValueError(
            "`augment` passes are not distributed by engine='ray'. Extract with --engine ray "
            "first, then run the same command with --engine local --augment K: it computes "
            f"only the augmented passes. Received: augment={config.augment}, engine='ray'"
        )
    fault_from_env()


def parts_folder(out: Path) -> Path:
    """Where the Ray parts of the cache ``out`` are written: ``<out>.parts/``."""
    return out.with_name(out.name + ".parts")


def actor_count(workers: int, gpus_per_worker: float, *, cpus: float, gpus: float,
                nodes: int) -> int:
    """How many model actors to run: ``workers``, or for 0 as many as the GPUs allow
    (``gpus // gpus_per_worker``), or one per node on CPUs (TensorFlow already uses every
    core of its node). Each actor holds one CPU, and one CPU at least must stay free for
    the decode tasks, or the pipeline would wait forever.

    Raises:
        ValueError: the cluster cannot run that many actors.
    """
    count = workers
    if count == 0:
        count = int(gpus // gpus_per_worker) if gpus_per_worker else nodes
        count = min(count, int(cpus) - 1)
    if count < 1 or count > cpus - 1 or count * gpus_per_worker > gpus:
        raise ValueError(
            f"A cluster of {cpus:g} CPUs and {gpus:g} GPUs cannot run "
            f"{workers or 'any'} model actors of 1 CPU and {gpus_per_worker:g} GPUs each "
            "and keep a CPU to decode. Received: "
            f"workers={workers}, gpus_per_worker={gpus_per_worker:g}"
        )
    return count


def block_rows(batch_size: int, size: tuple[int, int]) -> int:
    """Images per decode task: about 64 MiB of decoded float32 pixels (at most 1024),
    rounded down to whole batches (at least one), so most model batches are full.

    Large enough that scheduling a task costs little next to decoding it, small enough
    that every node's object store holds many blocks in flight.
    """
    per_image = size[0] * size[1] * 3 * 4
    rows = min(1024, max(1, (64 << 20) // per_image))
    return max(1, rows // batch_size) * batch_size


def listing_digest(records: Sequence[ImageRecord]) -> str:
    """sha256 of the image list (path, label, split in order): parts of one list share it."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.path}\t{r.label}\t{r.split}\n".encode())
    return digest.hexdigest()


def extract_on_ray(
    config: ExtractConfig,
    index: ImageIndex,
    feature_model: FeatureModel,
    writer: CacheWriter,
    todo: list[ImageRecord],
    stats: dict[str, tuple[int, int]],
) -> list[tuple[str, str]]:
    """Decode ``todo`` and run it through the base on a Ray cluster, then commit the rows
    to ``writer`` in ``todo`` order (the local engine's order).

    Images a part in ``<out>.parts`` already holds (an interrupted run, the file
    unchanged since) are not extracted again. If a part is lost (set aside as unreadable)
    one more Ray pass covers what no part holds; the parts are deleted once their rows
    are committed to the cache.

    Returns:
        The files skipped as unreadable, with their reasons.

    Raises:
        CacheError: a part made with another configuration, or images still missing.
        ExtractInterrupted: Ctrl-C or SIGTERM; the parts are kept for a resume.
    """
    folder = parts_folder(writer.final)
    attrs = {k: v for k, v in writer.attrs.items() if k not in _BOOKKEEPING}
    part_attrs = {**attrs, "part_of": writer.final.name,
                  "listing": listing_digest(index.records), "n_images": len(index.records)}
    found = _scan_parts(folder, attrs, stats)
    missing = [r for r in todo if r.path not in found]
    if len(missing) < len(todo):
        log.info("extract: ray: %d of the %d images are already in %s; extracting the other %d.",
                 len(todo) - len(missing), len(todo), folder, len(missing))
    previous = install_sigterm()
    try:
        if missing:
            with _ray_session(config.address) as ray:
                for _ in range(2):  # a second pass only for a part lost in the first
                    _run_pipeline(ray, config, feature_model.input_size,
                                  list(zip(index.positions([r.path for r in missing]),
                                           missing, strict=True)), index.root, stats,
                                  folder, part_attrs)
                    found = _scan_parts(folder, attrs, stats)
                    missing = [r for r in todo if r.path not in found]
                    if not missing:
                        break
        if missing:
            raise CacheError(
                f"{len(missing)} images are in no part after two Ray passes (first: "
                f"{missing[0].path}); the parts in {folder} are kept: run the same command "
                "again to finish."
            )
        entries = [found[r.path] for r in todo]
        rows = [(e.part, e.position) for e in entries if e.reason is None]
        skipped = [(e.part, e.position) for e in entries if e.reason is not None]
        progress = Progress(len(rows), "merge", log_every=config.log_every)
        try:
            copy_rows(writer, rows, skipped, on_rows=progress.update)
        finally:
            progress.close()
    except KeyboardInterrupt as exc:
        raise stopped(exc, f"the rows extracted so far are kept in {folder} and "
                           f"{writer.partial}. Run the same command again to resume.") from None
    finally:
        restore_sigterm(previous)
    n_parts = len({e.part for e in entries})
    _remove_parts(folder)
    log.info("extract: ray: %d rows and %d skipped files from %d parts committed to %s; "
             "parts deleted.", len(rows), len(skipped), n_parts, writer.partial)
    return [(r.path, e.reason) for r, e in zip(todo, entries, strict=True) if e.reason is not None]


def _remove_parts(folder: Path) -> None:
    """Delete the parts once the cache holds their rows (they would double the disk used)."""
    shutil.rmtree(folder)


def _scan_parts(folder: Path, attrs: dict[str, Any],
                stats: dict[str, tuple[int, int]]) -> dict[str, _Entry]:
    """Which images the parts in ``folder`` hold: path -> where (first part by name wins).

    Only entries whose file still has the recorded size and mtime count: a file changed
    since is extracted again. A part that cannot be read back is set aside (an actor
    killed mid-write can damage HDF5 metadata past its last commit).

    Raises:
        CacheError: a part was made with another configuration.
    """
    found: dict[str, _Entry] = {}
    for part in sorted(folder.glob("part-*.h5.partial")):
        try:
            diffs = identity_differences(read_attrs(part), attrs)
            state = read_row_state(part)
        except (CacheError, OSError, KeyError, RuntimeError) as exc:
            aside = part.with_name(part.name + ".corrupt")
            os.replace(part, aside)
            log.warning("extract: ray: %s is unreadable (%s); moved to %s, its images will be "
                        "extracted again.", part, exc, aside)
            continue
        if diffs:
            raise CacheError(
                f"{part} was made with another configuration:\n" + "\n".join(diffs)
                + f"\nDelete {folder} (or use another --out) to extract again."
            )
        for row, (path, size, mtime) in enumerate(
            zip(state.paths, state.size.tolist(), state.mtime_ns.tolist(), strict=True)
        ):
            if stats.get(path) == (size, mtime):
                found.setdefault(path, _Entry(part, row, None))
        for j, (path, reason, size, mtime) in enumerate(
            zip(state.skipped_paths, state.skipped_reasons, state.skipped_size.tolist(),
                state.skipped_mtime_ns.tolist(), strict=True)
        ):
            if stats.get(path) == (size, mtime):
                found.setdefault(path, _Entry(part, j, reason))
    return found


@contextmanager
def _ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected: to the cluster this process already joined, to
    ``address``, or to a local instance started here and stopped afterwards.

    Raises:
        ValueError: no cluster answers at ``address``.
    """
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ValueError(
                f"No Ray cluster answers at address={address!r} ({exc}). Start one with "
                "`ray start --head`, or leave --address unset to run a local one."
            ) from exc
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # one progress display, ours, also in a log
    try:
        yield ray
    finally:
        context.enable_progress_bars = bars
        if started:
            ray.shutdown()


def _run_pipeline(
    ray: Any,
    config: ExtractConfig,
    size: tuple[int, int],
    jobs: list[tuple[int, ImageRecord]],
    root: Path,
    stats: dict[str, tuple[int, int]],
    folder: Path,
    part_attrs: dict[str, Any],
) -> None:
    """Decode and extract ``jobs`` ((image-list position, record) pairs) into new parts."""
    import pyarrow as pa

    resources = ray.cluster_resources()
    n_actors = actor_count(
        config.workers, config.gpus_per_worker, cpus=resources.get("CPU", 0),
        gpus=resources.get("GPU", 0), nodes=sum(1 for n in ray.nodes() if n["Alive"]),
    )
    folder.mkdir(parents=True, exist_ok=True)
    devices = (f"with {config.gpus_per_worker:g} GPUs each" if config.gpus_per_worker
               else "on CPU")
    log.info("extract: ray: %d images, %d model actors %s, cluster %s (%g CPUs, %g GPUs); "
             "parts in %s", len(jobs), n_actors, devices, config.address or "local",
             resources.get("CPU", 0), resources.get("GPU", 0), folder)
    table = pa.table({
        "index": pa.array([i for i, _ in jobs], pa.int64()),
        "path": [str(root / r.path) for _, r in jobs],
        "rel": [r.path for _, r in jobs],
        "label": pa.array([r.label for _, r in jobs], pa.int64()),
        "split": [r.split for _, r in jobs],
        "size": pa.array([stats[r.path][0] for _, r in jobs], pa.int64()),
        "mtime_ns": pa.array([stats[r.path][1] for _, r in jobs], pa.int64()),
    })
    step = block_rows(config.batch_size, size)
    dataset = ray.data.from_arrow([table.slice(s, step) for s in range(0, len(jobs), step)])
    dataset = dataset.map_batches(
        decode_batch, batch_size=None, batch_format="numpy",
        fn_kwargs={"size": size, "interpolation": config.interpolation,
                   "jpeg_downscale": config.jpeg_downscale},
        # A decode worker holds TensorFlow (~330 MiB measured) and its block of pixels
        # twice at most. Declaring it also keeps decoding in tasks of its own on every
        # free CPU: Ray Data fuses a map into the next one when their resource requests
        # match, which would decode inside the model actors, one image at a time.
        memory=(512 << 20) + 2 * step * size[0] * size[1] * 3 * 4,
    ).map_batches(
        ForwardPass, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"config": config, "folder": str(folder), "attrs": part_attrs,
                               "fault": fault_from_env()},
        compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1,
        num_gpus=config.gpus_per_worker or None,
    )
    progress = Progress(len(jobs), "extract", log_every=config.log_every)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(len(batch["index"]))
    except ray.exceptions.RayError:
        # Ray retries lost workers itself; what reaches here is an error in our code on
        # the cluster (a float16 overflow, a weights file missing on a node): its remote
        # traceback follows.
        log.error("extract: ray: the run failed on the cluster (traceback below); the rows "
                  "committed so far are kept in %s: fix the cause and run the same command "
                  "again to resume.", folder)
        raise
    finally:
        progress.close()
