"""Shared fixtures: tiny image folders made in the test, and small saved probe models."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PYTHON = sys.executable


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_interruptible(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start ``cmd`` so that SIGINT reaches it as Ctrl-C would.

    A shell starts background jobs (``pytest ... &``) with SIGINT ignored, children inherit
    that, and Python keeps an ignored SIGINT ignored: the child would never see the signal.
    """
    return subprocess.Popen(cmd, preexec_fn=_default_sigint, **kwargs)


@contextmanager
def ctrl_c_in_a_gc_callback() -> Iterator[list[bool]]:
    """Send Ctrl-C to this process from inside the next gc callback, once.

    There Python's own handler loses it ("Exception ignored in: <function ...>"), as in
    JAX's ``_xla_gc_callback``. Yields a list that holds True once the signal is sent.
    """
    fired: list[bool] = []

    def callback(phase: str, info: dict) -> None:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        yield fired
    finally:
        gc.callbacks.remove(callback)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write a uint8 array as a PNG (lossless: decoded pixels equal ``pixels``)."""
    Image.fromarray(pixels).save(path)


def index_pixel(i: int, label: int) -> tuple[int, int, int]:
    """The constant colour that encodes image ``i`` of class ``label``."""
    return (i % 256, i // 256, 40 * label + 7)


def write_index_images(
    root: Path,
    n: int,
    *,
    classes: tuple[str, ...] = ("a", "b", "c"),
    splits: tuple[str, ...] | None = None,
) -> dict[str, int]:
    """Write ``n`` PNGs whose constant colour encodes their own index and label.

    Sizes vary so resizing is exercised (a constant image stays constant under bilinear
    resizing). Returns {relative path: index}.
    """
    rng = np.random.default_rng(n)
    expected = {}
    for i in range(n):
        label = i % len(classes)
        parts = [] if splits is None else [splits[(i // len(classes)) % len(splits)]]
        folder = root.joinpath(*parts, classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(5, 20, size=2))
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        pixels[...] = index_pixel(i, label)
        name = f"img{i:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        expected["/".join([*parts, classes[label], name])] = i
    return expected


@pytest.fixture(scope="session", autouse=True)
def cli_logging() -> None:
    """Library log lines on stderr as the CLI sends them, so tests that call the library
    directly read its warnings with capsys as a user reads them in a terminal."""
    from pipeline.util.log import configure_logging

    configure_logging()


@pytest.fixture(scope="session")
def probe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ``.keras`` base whose output is its input (1x1 identity conv), 8x8 input.

    With --pooling avg and --preprocess none, a constant image's features are its colour,
    so every row tells which file it came from.
    """
    import keras

    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="identity_conv")
    outputs = conv(inputs)
    model = keras.Model(inputs, outputs, name="probe")
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    path = tmp_path_factory.mktemp("models") / "probe.keras"
    model.save(path)
    return path


def bad_files(folder: Path) -> dict[str, str]:
    """Write unreadable files into ``folder``; return {name: expected reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    good = np.full((16, 16, 3), 128, dtype=np.uint8)
    path = folder / "truncated.jpg"
    Image.fromarray(good).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return {"zero.png": "empty", "text.jpg": "cannot", "truncated.jpg": "truncated"}
