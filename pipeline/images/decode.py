"""Decode and resize one image as Keras does (the whole image pipeline of one file).

Decoding: JPEGs (not CMYK ones) go through libjpeg-turbo with TF's settings
(:mod:`pipeline.images.kernels`: the bytes ``tf.io.decode_jpeg`` gives, faster, with or
without TensorFlow); CMYK JPEGs, PNG, GIF and BMP through ``tf.io.decode_image`` like
Keras (grayscale replicated, alpha dropped, palette expanded, 16-bit reduced to 8-bit,
first GIF frame); the other formats Pillow reads, and the BMPs TF does not read (1-, 4-
and 16-bit, run-length encoded, OS/2: Keras stops on them), go through Pillow, converted
the same way. The EXIF orientation is applied (Keras does not). Then Keras' resize:
bilinear in NumPy, bit-identical to ``tf.image.resize``; other methods with TF. So pixels
equal ``image_dataset_from_directory``'s for every file Keras reads. Without TensorFlow
Pillow decodes the rest: lossless formats give the same pixels; CMYK JPEGs differ by up to
~5 levels (Pillow sets libjpeg's IDCT and chroma upsampling otherwise than TF).

One explicit option departs from Keras' pixels: ``jpeg_downscale="dct"`` decodes a JPEG at
least twice the output size at 1/2, 1/4 or 1/8 scale in libjpeg-turbo's DCT domain
(:func:`~pipeline.images.kernels.dct_reduction`) before the same resize: faster, and
recorded in the cache so everything downstream decodes the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.images.formats import (
    PNG_SIGNATURE,
    exif_orientation,
    jpeg_header,
    png_orientation,
    png_without_inflated_chunks,
    tf_reads_bmp,
)
from pipeline.images.kernels import (
    dct_reduction,
    decode_jpeg,
    has_fast_jpeg,
    preprocess_pixels,
    resize_bilinear,
)
from pipeline.util.quiet import quiet_tensorflow

__all__ = [
    "INTERPOLATIONS",
    "JPEG_DOWNSCALES",
    "MAX_PIXELS",
    "ImageReadError",
    "check_interpolation",
    "check_jpeg_downscale",
    "decode_bytes",
    "decode_image",
    "has_tensorflow",
    "load_image",
    "parse_size",
    "read_image",
    "read_image_into",
    "read_images_into",
    "resize",
    "resize_bilinear",
]

INTERPOLATIONS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)


# --jpeg-downscale: "off" decodes every JPEG at full size (Keras' pixels); "dct" lets
# libjpeg-turbo reduce a JPEG >= 2x the input size in the DCT domain first (faster, other
# pixels). A cache made before the option existed means "off" (cache.schema.IDENTITY_DEFAULTS).
JPEG_DOWNSCALES = ("off", "dct")


# Pillow warns between 1x and 2x this many pixels and raises above 2x; we refuse above 1x
# ourselves (a clear skip reason instead of a warning nobody reads in a batch log).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageReadError(Exception):
    """An image that cannot be decoded; the message is the skip reason."""


def check_interpolation(interpolation: str) -> str:
    """Validate ``--interpolation``, any case, as Keras does; return it in lower case (the
    form recorded in a cache).

    Raises:
        ValueError: not one of ``INTERPOLATIONS``.
    """
    name = interpolation.lower() if isinstance(interpolation, str) else interpolation
    if name not in INTERPOLATIONS:
        raise ValueError(f"`interpolation` must be one of {INTERPOLATIONS} (any case). "
                         f"Received: interpolation={interpolation!r}")
    return name


def check_jpeg_downscale(jpeg_downscale: str) -> str:
    """Validate ``--jpeg-downscale``; return it.

    Raises:
        ValueError: not one of ``JPEG_DOWNSCALES``.
    """
    if jpeg_downscale not in JPEG_DOWNSCALES:
        raise ValueError(f"`jpeg_downscale` must be one of {JPEG_DOWNSCALES}. "
                         f"Received: jpeg_downscale={jpeg_downscale!r}")
    return jpeg_downscale


def parse_size(value: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse ``--input-size``: ``N`` (square) or ``HxW``.

    Raises:
        ValueError: the value is not N or HxW with positive integers.
    """
    if value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, tuple):
        h, w = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
        if not match:
            raise ValueError(
                "`input_size` must be N or HxW with positive integers (e.g. 224 or 150x200). "
                f"Received: input_size={value!r}"
            )
        h = int(match.group(1))
        w = int(match.group(2) or match.group(1))
    if h < 1 or w < 1:
        raise ValueError(f"`input_size` must be positive. Received: input_size={value!r}")
    return int(h), int(w)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """8-bit RGB array from any Pillow mode."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # tf.image.decode_image maps 16-bit to 8-bit with an integer division by 256.
        gray = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode == "F":
        gray = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


# Formats whose decoding is left to TensorFlow, exactly as Keras does, so pixels match
# image_dataset_from_directory (Pillow's JPEG decoder rounds chroma differently).
_TF_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP"}


# JPEGs libjpeg-turbo decodes to TF's pixels (CMYK ones go to TF, or Pillow without it).
_FAST_JPEG_FORMATS = {"JPEG", "MPO"}
_FAST_JPEG_MODES = {"RGB", "L"}


# (EXIF orientation, pixels or None when TF is to decode them, box): what _inspect finds.
# box: (top, left, height, width) of the image within the pixels when a DCT-reduced
# decode's edge row and column are partly padding (resize_bilinear's ``box``); None for a
# full decode.
_Inspected = tuple[int, np.ndarray | None, tuple[float, float, float, float] | None]


def _fast_jpeg(data: bytes, orientation: int, stored: tuple[int, int],
               downscale_to: tuple[int, int] | None = None) -> _Inspected | None:
    """A JPEG's orientation and pixels from libjpeg-turbo, oriented; None when it is no
    JPEG it decodes (then TF, or Pillow, decodes it and words the skip reason).

    ``stored``: its (height, width) in the file. ``downscale_to``: the output size when
    a JPEG >= 2x it may be decoded at 1/2, 1/4 or 1/8 in the DCT domain. That size is of
    the oriented image: EXIF orientations 5-8 turn the stored one by 90 degrees, so the
    stored height is compared with the output's width.
    """
    if not has_fast_jpeg():
        return None
    d = 1
    if downscale_to is not None:
        d = dct_reduction(*stored, downscale_to[::-1] if orientation >= 5 else downscale_to)
    try:
        pixels = decode_jpeg(data, None if d == 1 else (-(-stored[0] // d), -(-stored[1] // d)))
    except Exception:  # noqa: BLE001 - the fallback decoder judges the file
        return None
    box = None if d == 1 else _oriented_box(pixels.shape[:2], stored[0] / d, stored[1] / d,
                                            orientation)
    return orientation, _orient(pixels, orientation), box


def _oriented_box(shape: tuple[int, int], height: float, width: float,
                  orientation: int) -> tuple[float, float, float, float]:
    """The box (top, left, height, width) of the image within a reduced decode of
    ``shape`` once oriented: stored, it spans ``height`` x ``width`` from the top left
    (the bottom row and right column partly padding); flips move that padding to the
    other edge, 90-degree turns swap the axes (the moves of :func:`_orient`)."""
    axes, transpose = _ORIENTATIONS.get(orientation, ((), False))
    top = shape[0] - height if 0 in axes else 0.0
    left = shape[1] - width if 1 in axes else 0.0
    return (left, top, width, height) if transpose else (top, left, height, width)


_TF_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "I;16", "I;16B", "I;16L", "I", "YCbCr",
             "CMYK"}


# Each EXIF orientation's index shuffle: flip these axes, then maybe transpose
# (6 is np.rot90(a, -1) == transpose(flip(a, 0)), 8 is np.rot90(a, 1) == transpose(flip(a, 1))).
_ORIENTATIONS = {2: ((1,), False), 3: ((0, 1), False), 4: ((0,), False), 5: ((), True),
                 6: ((0,), True), 7: ((0, 1), True), 8: ((1,), True)}


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array, as ImageOps.exif_transpose
    (the shuffles of :data:`_ORIENTATIONS`, which TF's graph and the DCT box also follow)."""
    axes, transpose = _ORIENTATIONS.get(orientation, ((), False))
    if not axes and not transpose:
        return pixels
    moved = np.flip(pixels, axes) if axes else pixels
    return np.ascontiguousarray(moved.transpose(1, 0, 2) if transpose else moved)


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as file:  # not Path(path).read_bytes(): a new Path per file
            return file.read()
    except OSError as exc:
        raise ImageReadError(f"cannot read file: {exc.strerror or exc}") from exc


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one file to a (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Raises:
        ImageReadError: see :func:`decode_bytes`.
    """
    return decode_bytes(_read_bytes(path))


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode an encoded image to a (H, W, 3) uint8 RGB array, EXIF orientation applied.

    JPEG, PNG, GIF and BMP are decoded by ``tf.io.decode_image`` (Keras' own decoder);
    other formats Pillow reads (WebP, TIFF, ...) and BMPs TF does not read by Pillow.

    Raises:
        ImageReadError: the data is empty, truncated, not an image or too large; the
            message is the reason recorded in the cache.
    """
    with _reasons(data):
        orientation, pixels, _ = _inspect(data)
        if pixels is None:
            tf = quiet_tensorflow()
            decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
            pixels = _orient(decoded.numpy(), orientation)
        return pixels


@contextlib.contextmanager
def _reasons(data: bytes) -> Iterator[None]:
    """Turn any decoder failure on ``data`` into an :class:`ImageReadError` whose message
    is the reason, in plain words (never a decoder's internal text)."""
    try:
        yield
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"possible decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        kind = _kind(data)
        reason = (f"truncated or corrupt {kind}" if kind != "image"
                  else "not an image format Pillow or TF reads")
        raise ImageReadError(f"cannot decode image: {reason}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a skip reason
        raise ImageReadError(f"cannot decode image: {_plain_reason(exc, data)}") from exc


# File signatures, to name the format in a reason when no decoder got that far.
_SIGNATURES = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
               b"RIFF": "WebP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


# What TF's kernels and Pillow's plugins say (lower-cased) about damaged bytes.
_DAMAGE = ("truncated", "premature end", "jpeg::uncompress failed", "invalid jpeg data",
           "invalid png data", "invalid gif data", "failed to slurp", "input size should match",
           "broken data stream", "could not create decoder object", "corrupt")


# TF's wrapping of an op's message: {{function_node ...}}, [[{{node ...}}]], [Op:...].
_TF_WRAPPING = re.compile(r"\[\[.*?\]\]|\{\{.*?\}\}|\[Op:[^\]]*\]")


def _kind(data: bytes) -> str:
    """The format ``data`` claims by its signature ("image" when none is known)."""
    return next((kind for sig, kind in _SIGNATURES.items() if data.startswith(sig)), "image")


def _plain_reason(exc: BaseException, data: bytes) -> str:
    """A decoder's exception in plain words: "truncated or corrupt PNG", or its message
    on one line without TF's wrapping."""
    text = str(exc)
    if any(words in text.lower() for words in _DAMAGE):
        return f"truncated or corrupt {_kind(data)}"
    text = " ".join(_TF_WRAPPING.sub(" ", text.strip().splitlines()[0] if text.strip()
                                     else "").split())
    return text or type(exc).__name__


def _inspect(data: bytes, downscale_to: tuple[int, int] | None = None) -> _Inspected:
    """(EXIF orientation, pixels, box) where pixels is None when TensorFlow is to decode
    them.

    Only the header is read first (format, mode, size, EXIF), so bombs and non-images are
    refused before any pixel is decoded; then libjpeg-turbo decodes the JPEGs it decodes as
    TF does, TF the other files it reads (when installed), Pillow the rest. A JPEG's
    header is walked here (:func:`jpeg_header`), any other file's Pillow reads.
    ``downscale_to``: the output size, when libjpeg-turbo may reduce a large JPEG in the
    DCT domain (``jpeg_downscale="dct"``); the pixels are then smaller than the file's,
    and box is the part of them the image covers (see ``_Inspected``).
    """
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    if data.startswith(b"\xff\xd8") and has_fast_jpeg():
        found = _inspect_jpeg(data, downscale_to)
        if found is not None:
            return found
    try:
        return _inspect_with_pillow(data, downscale_to)
    except ValueError:
        if not data.startswith(PNG_SIGNATURE):
            raise
        # Pillow caps each inflated text / ICC chunk at PngImagePlugin.MAX_TEXT_CHUNK (1 MB;
        # a few KB on disk exceed it) and refuses the file; TF (Keras) ignores those chunks.
        # Reading the header without them keeps the cap, module-wide, for everyone else.
        return _inspect_with_pillow(png_without_inflated_chunks(data))


def _inspect_jpeg(data: bytes, downscale_to: tuple[int, int] | None) -> _Inspected | None:
    """A JPEG's orientation and pixels from its own markers and libjpeg-turbo, the checks
    and results of :func:`_inspect_with_pillow`; None when Pillow is to look (no frame
    header before the scans, CMYK, or libjpeg-turbo refused it)."""
    header = jpeg_header(data)
    if header.components not in (1, 3):
        return None
    _check_size(header.width, header.height)
    if not header.complete:
        raise ImageReadError(_TRUNCATED_JPEG)
    return _fast_jpeg(data, exif_orientation(header.exif), (header.height, header.width),
                      downscale_to)


_TRUNCATED_JPEG = "cannot decode image: truncated JPEG (the file ends before the image does)"


def _check_size(width: int, height: int) -> None:
    """Refuse a bomb from its header.

    Raises:
        ImageReadError: more than ``MAX_PIXELS`` pixels.
    """
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"image too large ({width}x{height} pixels > {MAX_PIXELS}): "
                             "possible decompression bomb")


def _inspect_with_pillow(data: bytes,
                         downscale_to: tuple[int, int] | None = None) -> _Inspected:
    with Image.open(io.BytesIO(data)) as im:
        _check_size(im.width, im.height)
        if im.format in ("JPEG", "MPO") and not jpeg_header(data).complete:
            raise ImageReadError(_TRUNCATED_JPEG)
        orientation = (png_orientation(data) if im.format == "PNG"
                       else int(im.getexif().get(0x0112, 1) or 1))
        if im.format in _FAST_JPEG_FORMATS and im.mode in _FAST_JPEG_MODES:
            found = _fast_jpeg(data, orientation, (im.height, im.width), downscale_to)
            if found is not None:
                return found
        if (im.format in _TF_FORMATS and im.mode in _TF_MODES and has_tensorflow()
                and (im.format != "BMP" or tf_reads_bmp(data))):
            return orientation, None, None
        im.load()
        return orientation, _to_rgb(ImageOps.exif_transpose(im)), None


@functools.lru_cache(maxsize=64)
def _tf_decode_resize(size: tuple[int, int], interpolation: str, orientation: int) -> Any:
    """One traced graph: decode -> EXIF orientation -> Keras' resize, for one output size.

    Why: called eagerly, decode_image and resize each pay TF's Python dispatch while
    holding the GIL, which starves the decode threads; one graph call releases it for the
    whole image (+25-33 % images/s on the input side, pixels bit-identical to the eager
    ops). Orientation is baked in as a Python constant: at most 8 graphs per size.
    """
    tf = quiet_tensorflow()
    axes, transpose = _ORIENTATIONS.get(orientation, ((), False))

    def orient(x: Any) -> Any:
        x = tf.reverse(x, list(axes)) if axes else x
        return tf.transpose(x, [1, 0, 2]) if transpose else x

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def decode_resize(data: Any) -> Any:
        pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
        pixels.set_shape([None, None, 3])
        # float32 for every method ("nearest" would keep uint8), as resize() returns.
        return tf.cast(tf.image.resize(orient(pixels), size, method=interpolation), tf.float32)

    return decode_resize


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (a JAX- or torch-only GPU box has none)."""
    return importlib.util.find_spec("tensorflow") is not None


def load_image(
    path: str | os.PathLike, size: tuple[int, int], interpolation: str = "bilinear",
    jpeg_downscale: str = "off",
) -> np.ndarray:
    """Decode and resize one image to (H, W, 3) float32 in 0..255, as Keras does.

    Without TensorFlow, Pillow decodes every format and :func:`resize_bilinear` resizes
    (bilinear only), so the pipeline also runs on a JAX- or torch-only machine.
    ``jpeg_downscale="dct"``: a JPEG >= 2x ``size`` is first reduced in the DCT domain
    (faster; not Keras' pixels).

    Raises:
        ImageReadError: see :func:`decode_bytes`.
        ValueError: an interpolation other than bilinear without TensorFlow.
    """
    # A writable copy: callers preprocess in place.
    return np.array(_decode_resized(_read_bytes(path), size, interpolation,
                                    jpeg_downscale=jpeg_downscale))


def read_image(
    path: str | os.PathLike, size: tuple[int, int], interpolation: str = "bilinear",
    out: np.ndarray | None = None, jpeg_downscale: str = "off",
) -> tuple[np.ndarray, str]:
    """:func:`load_image` plus the sha256 of the file's bytes (read once for both).

    The pixels are written to ``out`` when given (a C-contiguous float32 (H, W, 3) slot of
    a batch, saving a copy). Without it they may be a read-only view of TensorFlow's
    buffer: callers copy them into their batch (the Ray workers do).

    Raises:
        ImageReadError: see :func:`decode_bytes`.
    """
    data = _read_bytes(path)
    return (_decode_resized(data, size, interpolation, out, jpeg_downscale),
            hashlib.sha256(data).hexdigest())


def _decode_resized(data: bytes, size: tuple[int, int], interpolation: str,
                    out: np.ndarray | None = None, jpeg_downscale: str = "off") -> np.ndarray:
    """Decode + orient + resize (into ``out`` when given), through one TF graph when TF
    decodes this file; a large JPEG reduced in the DCT domain first when
    ``jpeg_downscale="dct"``.

    Raises:
        ImageReadError: see :func:`decode_bytes`.
        ValueError: an unknown interpolation or jpeg_downscale.
    """
    interpolation = check_interpolation(interpolation)
    downscale_to = tuple(size) if check_jpeg_downscale(jpeg_downscale) == "dct" else None
    with _reasons(data):
        orientation, pixels, box = _inspect(data, downscale_to)
    if pixels is None:
        try:
            resized = np.asarray(_tf_decode_resize(tuple(size), interpolation,
                                                   orientation)(data))
        except Exception:  # noqa: BLE001 - the eager decoder below words the skip reason
            pixels = decode_bytes(data)  # raises ImageReadError with the eager op's message
        else:
            if out is None:
                return resized
            out[...] = resized
            return out
    if box is not None and interpolation == "bilinear":
        return resize_bilinear(pixels, size, out, box)
    # Other methods (TF's kernels) map the reduced decode's partial last row and column as
    # whole ones: a stretch of under one reduced pixel at the far edges.
    return resize(pixels, size, interpolation, out)


def read_image_into(path: str | os.PathLike, size: tuple[int, int], interpolation: str,
                    out: np.ndarray, jpeg_downscale: str = "off", preprocess: str = "none",
                    ) -> tuple[str | None, str | None]:
    """:func:`read_image` into ``out`` (a batch slot), its failure as a value; the pixels
    then preprocessed in place with a mode of
    :func:`~pipeline.images.kernels.preprocess_pixels` (``none``: left in 0..255).

    Returns:
        ``(sha256, None)`` when the file was read, ``(None, reason)`` when it is skipped.
    """
    try:
        digest = read_image(path, size, interpolation, out=out,
                            jpeg_downscale=jpeg_downscale)[1]
    except ImageReadError as exc:
        return None, str(exc)
    preprocess_pixels(out, preprocess)
    return digest, None


_ATTACHED: dict[str, Any] = {}  # shared batch buffers this worker process has opened


def read_images_into(
    buffer: str, first_slot: int, paths: list[str], size: tuple[int, int],
    interpolation: str = "bilinear", jpeg_downscale: str = "off", preprocess: str = "none",
) -> list[tuple[str | None, str | None]]:
    """:func:`read_image_into` of several files in a worker process: file k's pixels go to
    slot ``first_slot + k`` of the shared memory block ``buffer`` (float32 (H, W, 3) slots).

    Why: one task per run of files, not per file, so the parent pays one future and one
    message per run; and pixels never travel through a pipe (600 KB each at 224 px) but
    are written into the batch the parent hands out.
    """
    shm = _ATTACHED.get(buffer)
    if shm is None:
        from multiprocessing import shared_memory

        # Spawned workers share the parent's resource tracker, which records the block
        # once; the parent unlinks it when the batches are done.
        shm = _ATTACHED[buffer] = shared_memory.SharedMemory(name=buffer)
    slot_bytes = size[0] * size[1] * 3 * 4
    return [read_image_into(path, size, interpolation,
                            np.ndarray((*size, 3), np.float32, shm.buf,
                                       offset=(first_slot + k) * slot_bytes),
                            jpeg_downscale, preprocess)
            for k, path in enumerate(paths)]


def resize(pixels: np.ndarray, size: tuple[int, int], interpolation: str,
           out: np.ndarray | None = None) -> np.ndarray:
    """Resize decoded pixels to (H, W, 3) float32 with Keras' kernel (NumPy without TF),
    into ``out`` when given.

    Raises:
        ValueError: an unknown interpolation, or one other than bilinear without TensorFlow.
    """
    interpolation = check_interpolation(interpolation)
    if interpolation == "bilinear":  # bit-identical to TF's kernel, and faster
        return resize_bilinear(pixels, size, out)
    if not has_tensorflow():
        raise ValueError(
            "Without TensorFlow only bilinear resizing is available. "
            f"Received: interpolation={interpolation!r}"
        )
    tf = quiet_tensorflow()  # Keras' resize kernel; imported late to keep the CLI fast

    resized = tf.image.resize(pixels, size, method=interpolation)
    if out is not None:
        out[...] = resized
        return out
    # A writable copy: preprocessing works in place.
    return np.array(resized, dtype=np.float32)
