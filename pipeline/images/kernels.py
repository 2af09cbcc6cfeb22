"""Pixel kernels that give Keras' pixels without TensorFlow, faster than TensorFlow's own.

    decode_jpeg       libjpeg-turbo through ``simplejpeg`` with TF's decoder settings (fast
                      integer IDCT, fancy upsampling): the bytes ``tf.io.decode_jpeg`` gives
    resize_bilinear   ``tf.image.resize(method="bilinear")`` in NumPy, the same float32
                      operations in the same order: bit-identical, ~1.3 ms for a 500x375
                      photo to 224 px (TF's kernel: ~2.2 ms)

Both heavy kernels release the GIL for most of their time (libjpeg-turbo, NumPy loops), and
neither needs TensorFlow, so a JAX- or torch-only box gets the same pixels as Keras.
tests/test_keras_parity.py holds them to ``image_dataset_from_directory`` byte for byte.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

__all__ = ["decode_jpeg", "has_fast_jpeg", "resize_bilinear"]


@functools.cache
def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError:  # a platform without its wheel: TF or Pillow decodes instead
        return None
    return simplejpeg


def has_fast_jpeg() -> bool:
    """Whether ``simplejpeg`` (libjpeg-turbo) is importable here."""
    return _simplejpeg() is not None


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a JPEG to (H, W, 3) uint8 RGB exactly as ``tf.io.decode_jpeg(channels=3)``.

    TF's defaults are libjpeg's fast integer IDCT and fancy (smooth) chroma upsampling;
    Pillow's and OpenCV's differ from them by up to 7 levels. Grayscale JPEGs come back
    with the gray value in all three channels, as from TF.

    Raises:
        ValueError, RuntimeError: the data is no JPEG libjpeg-turbo decodes (CMYK, damaged,
            arithmetic-coded): the caller falls back to TF or Pillow, which word the reason.
        ImportError: ``simplejpeg`` is not installed (see :func:`has_fast_jpeg`).
    """
    simplejpeg = _simplejpeg()
    if simplejpeg is None:
        raise ImportError("simplejpeg is not installed")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


@functools.lru_cache(maxsize=256)
def _bilinear_plan(
    height: int, width: int, out_h: int, out_w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows, flat (x, channel) source columns and weights for one resize shape.

    TF's kernel (half-pixel centres, no antialiasing): ``in = (out + 0.5) * scale - 0.5``
    in float32 with ``scale = in_size / out_size``; the lower neighbour is ``floor(in)``
    and the upper ``ceil(in)``, both clamped to the image; the weight ``in - floor(in)``.
    """
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = ((np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                  * np.float32(n_in / n_out) - np.float32(0.5))
        floor = np.floor(centre)
        lower = np.clip(floor, 0, n_in - 1).astype(np.intp)
        upper = np.clip(np.ceil(centre), 0, n_in - 1).astype(np.intp)
        return lower, upper, (centre - floor).astype(np.float32)

    y0, y1, wy = axis(height, out_h)
    x0, x1, wx = axis(width, out_w)
    channel = np.arange(3)
    # Columns of the image seen as (H, W*3): one gather per side for all three channels.
    left = (x0[:, None] * 3 + channel).ravel()
    right = (x1[:, None] * 3 + channel).ravel()
    return np.concatenate([y0, y1]), left, right, np.repeat(wx, 3), wy[:, None]


_SCRATCH = threading.local()  # per-thread work arrays of resize_bilinear, reused per call
_SCRATCH_KEEP = 64 << 20  # bytes: a rare huge photo's work arrays are not kept


def _scratch(name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A reusable (shape) work array of this thread, contents undefined.

    Why: fresh multi-MB temporaries are mmapped and returned to the OS on every call by
    glibc's malloc, and faulting their pages in again cost ~900 page faults and about half
    the resize time per 224 px image (docs/performance.md, "Update 2026-12-03b").
    """
    size = shape[0] * shape[1]
    held = getattr(_SCRATCH, name, None)
    if held is None or held.size < size:
        held = np.empty(size, dtype)
        if held.nbytes <= _SCRATCH_KEEP:
            setattr(_SCRATCH, name, held)
    return held[:size].reshape(shape)


def resize_bilinear(pixels: np.ndarray, size: tuple[int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
    """``tf.image.resize(method="bilinear")`` of (H, W, 3) pixels, bit for bit, in NumPy.

    The same float32 operations in TF's order (x-lerp of the upper and lower source rows,
    then the y-lerp), each a separate IEEE operation, so the result does not depend on
    the CPU. Only the pixels used are gathered and converted: a photo never becomes float32
    as a whole, and the work arrays are reused from call to call in each thread.

    Args:
        out: a C-contiguous (size[0], size[1], 3) float32 array to write the result to
            (a batch slot, shared memory), saving a copy.

    Returns:
        ``out``, or a new writable (size[0], size[1], 3) float32 array, in 0..255.
    """
    height, width = pixels.shape[:2]
    out_h, out_w = size
    rows, left, right, wx, wy = _bilinear_plan(height, width, out_h, out_w)
    if out is None:
        out = np.empty((out_h, out_w, 3), np.float32)
    flat = _scratch("rows", (2 * out_h, width * 3), np.uint8)  # rows y0 then rows y1
    # mode="clip": the indices are in range, and "raise" would buffer the output.
    np.take(np.ascontiguousarray(pixels).reshape(height, width * 3), rows, axis=0, out=flat,
            mode="clip")
    gathered = _scratch("gathered", (2 * out_h, out_w * 3), np.uint8)
    lerp = _scratch("lerp", gathered.shape, np.float32)
    upper = _scratch("upper", gathered.shape, np.float32)
    np.take(flat, left, axis=1, out=gathered, mode="clip")
    lerp[...] = gathered
    np.take(flat, right, axis=1, out=gathered, mode="clip")
    upper[...] = gathered
    upper -= lerp
    upper *= wx
    lerp += upper  # left + (right - left) * wx
    top, bottom = lerp[:out_h], lerp[out_h:]
    bottom -= top
    bottom *= wy
    np.add(top, bottom, out=out.reshape(out_h, out_w * 3))  # top + (bottom - top) * wy
    return out
