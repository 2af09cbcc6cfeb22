"""Pixel kernels that give Keras' pixels without TensorFlow, faster than TensorFlow's own.

    decode_jpeg       libjpeg-turbo through ``simplejpeg`` with TF's decoder settings (fast
                      integer IDCT, fancy upsampling): the bytes ``tf.io.decode_jpeg`` gives
    resize_bilinear   ``tf.image.resize(method="bilinear")`` in NumPy, the same float32
                      operations in the same order: bit-identical, ~1.3 ms for a 500x375
                      photo to 224 px (TF's kernel: ~2.2 ms)
    dct_reduction     the 1/2, 1/4 or 1/8 scale ``decode_jpeg(min_size=...)`` has
                      libjpeg-turbo decode a large JPEG at in the DCT domain under
                      ``--jpeg-downscale dct`` (an option: pixels differ from Keras',
                      docs/performance.md)
    preprocess_pixels Keras' ``imagenet_utils.preprocess_input`` modes in place, the same
                      float32 operations, so decode workers can preprocess each image in
                      its batch slot without importing Keras

Both heavy kernels release the GIL for most of their time (libjpeg-turbo, NumPy loops), and
neither needs TensorFlow, so a JAX- or torch-only box gets the same pixels as Keras.
tests/test_keras_parity.py holds them to ``image_dataset_from_directory`` byte for byte.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

__all__ = [
    "PREPROCESS_MODES",
    "decode_jpeg",
    "dct_reduction",
    "has_fast_jpeg",
    "preprocess_pixels",
    "resize_bilinear",
]


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


def decode_jpeg(data: bytes, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a JPEG to (H, W, 3) uint8 RGB exactly as ``tf.io.decode_jpeg(channels=3)``.

    TF's defaults are libjpeg's fast integer IDCT and fancy (smooth) chroma upsampling;
    Pillow's and OpenCV's differ from them by up to 7 levels. Grayscale JPEGs come back
    with the gray value in all three channels, as from TF.

    Args:
        min_size: ``(ceil(height / d), ceil(width / d))`` for a ``d`` from
            :func:`dct_reduction`: libjpeg-turbo decodes at the smallest M/8 scale whose
            size is at least this (1/d once a side is 8 px or more), in the DCT domain
            (its scaled IDCTs), so the pixels are *not* TF's. None: full size, TF's pixels.

    Raises:
        ValueError, RuntimeError: the data is no JPEG libjpeg-turbo decodes (CMYK, damaged,
            arithmetic-coded): the caller falls back to TF or Pillow, which word the reason.
        ImportError: ``simplejpeg`` is not installed (see :func:`has_fast_jpeg`).
    """
    simplejpeg = _simplejpeg()
    if simplejpeg is None:
        raise ImportError("simplejpeg is not installed")
    if min_size is None:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False,
                                  min_height=min_size[0], min_width=min_size[1])


# DCT-domain reductions tried, strongest first: libjpeg-turbo has SIMD IDCTs for 1/2, 1/4
# and 1/8 only; its 3/8, 5/8 ... IDCTs are plain C, and a 5/8 decode measured slower than a
# full one (docs/performance.md, "DCT-domain JPEG downscaling").
_REDUCTIONS = (8, 4, 2)


def dct_reduction(height: int, width: int, size: tuple[int, int]) -> int:
    """``d``: decode a ``height`` x ``width`` JPEG at 1/d before resizing it to ``size``.

    The strongest reduction 1/2, 1/4 or 1/8 that keeps both sides at least ``size``'s:
    a photo at least 2x the output on both sides is decoded at 1/2 or less, in the DCT
    domain, which is faster and averages pixels (less aliasing than the bilinear kernel
    alone); the bilinear resize then goes the rest of the way. libjpeg-turbo decodes
    ``(ceil(height / d), ceil(width / d))`` pixels; the last row and column cover only
    ``height / d`` and ``width / d`` of them when the sides are no multiples of ``d``.

    Args:
        height, width: the JPEG's stored size (before any EXIF rotation).
        size: the output (height, width) in the same, stored, orientation.

    Returns:
        2, 4 or 8; 1 when no reduction applies (a full decode).
    """
    if max(height, width) < 8:  # a smaller M/8 scale could give the same size
        return 1
    return next((d for d in _REDUCTIONS if height >= d * size[0] and width >= d * size[1]), 1)


@functools.lru_cache(maxsize=256)
def _bilinear_plan(
    height: int, width: int, out_h: int, out_w: int,
    box: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows, flat (x, channel) source columns and weights for one resize shape.

    TF's kernel (half-pixel centres, no antialiasing): ``in = (out + 0.5) * scale - 0.5``
    in float32 with ``scale = in_size / out_size``; the lower neighbour is ``floor(in)``
    and the upper ``ceil(in)``, both clamped to the image; the weight ``in - floor(in)``.
    A ``box`` (see :func:`resize_bilinear`) replaces ``in_size`` in the scale by its
    extent and shifts ``in`` by its start.
    """
    def axis(n_in: int, n_out: int,
             start: float | None, extent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = ((np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                  * np.float32(extent / n_out) - np.float32(0.5))
        if start is not None:
            centre += np.float32(start)
        floor = np.floor(centre)
        lower = np.clip(floor, 0, n_in - 1).astype(np.intp)
        upper = np.clip(np.ceil(centre), 0, n_in - 1).astype(np.intp)
        return lower, upper, (centre - floor).astype(np.float32)

    top, left, box_h, box_w = (None, None, height, width) if box is None else box
    y0, y1, wy = axis(height, out_h, top, box_h)
    x0, x1, wx = axis(width, out_w, left, box_w)
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
                    out: np.ndarray | None = None,
                    box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """``tf.image.resize(method="bilinear")`` of (H, W, 3) pixels, bit for bit, in NumPy.

    The same float32 operations in TF's order (x-lerp of the upper and lower source rows,
    then the y-lerp), each a separate IEEE operation, so the result does not depend on
    the CPU. Only the pixels used are gathered and converted: a photo never becomes float32
    as a whole, and the work arrays are reused from call to call in each thread.

    Args:
        out: a C-contiguous (size[0], size[1], 3) float32 array to write the result to
            (a batch slot, shared memory), saving a copy.
        box: (top, left, height, width) of the source, in its own pixels, that the
            output covers, when not all of it: a JPEG decoded at 1/d whose sides are no
            multiples of d stands for ``height / d`` rows, one edge row part padding.
            None: the whole source, TF's kernel.

    Returns:
        ``out``, or a new writable (size[0], size[1], 3) float32 array, in 0..255.
    """
    height, width = pixels.shape[:2]
    out_h, out_w = size
    rows, left, right, wx, wy = _bilinear_plan(height, width, out_h, out_w, box)
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


PREPROCESS_MODES = ("none", "scale", "tf", "caffe", "torch")

# keras.applications.imagenet_utils' constants, as the float32 values its in-place NumPy
# operations on float32 pixels use (a Python float meets float32 as float32: NEP 50).
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


@functools.lru_cache(maxsize=32)
def _tiled(values: tuple[float, ...], width: int) -> np.ndarray:
    """``values`` as float32, repeated for each of ``width`` pixels of a (W*3) row."""
    return np.tile(np.array(values, np.float32), width)


def _per_channel(x: np.ndarray, values: tuple[float, ...], op: Any) -> None:
    """``op(x[..., c], values[c])`` in place for each channel c.

    Why tiled rows: broadcasting a (3,) array makes NumPy's innermost loop 3 elements
    long, ~5x slower per image than one pass over (W*3)-long rows (measured at 224 px).
    """
    if x.ndim >= 2 and x.flags.c_contiguous:
        width = x.shape[-2]
        rows = x.reshape(-1, width * 3)
        op(rows, _tiled(values, width), out=rows)
    else:
        op(x, np.array(values, np.float32), out=x)


def preprocess_pixels(x: np.ndarray, mode: str) -> np.ndarray:
    """Preprocess float32 RGB pixels in 0..255, shape (..., 3), in place; return ``x``.

    ``tf``, ``caffe`` and ``torch`` give the values of Keras'
    ``imagenet_utils.preprocess_input(x, mode=...)`` bit for bit: the same IEEE float32
    operations on each element, in the same order (tests/test_bases.py holds every
    application to it). ``caffe`` writes its BGR channels into ``x`` itself, where Keras
    returns a reversed view. ``scale`` divides by 255; ``none`` leaves ``x`` as it is.

    Why here and not in Keras: decode workers preprocess each image in its batch slot while
    it is in their cache, so the process feeding the forward pass touches no pixel, and a
    spawned worker must not pay a Keras (TensorFlow) import.

    Raises:
        ValueError: ``mode`` is not one of ``PREPROCESS_MODES``.
    """
    if mode == "none":
        return x
    if mode == "scale":
        x /= np.float32(255.0)
    elif mode == "tf":
        x /= np.float32(127.5)
        x -= np.float32(1.0)
    elif mode == "torch":
        x /= np.float32(255.0)
        _per_channel(x, _TORCH_MEAN, np.subtract)
        _per_channel(x, _TORCH_STD, np.true_divide)
    elif mode == "caffe":
        # RGB -> BGR and the mean, one channel at a time (strided, but long, loops).
        red = x[..., 0].copy()
        np.subtract(x[..., 2], _CAFFE_MEAN_BGR[0], out=x[..., 0])
        x[..., 1] -= _CAFFE_MEAN_BGR[1]
        np.subtract(red, _CAFFE_MEAN_BGR[2], out=x[..., 2])
    else:
        raise ValueError(
            f"`preprocess` must be one of {PREPROCESS_MODES}. Received: preprocess={mode!r}"
        )
    return x
