"""Arrays whose memory a backend can use as it is."""

from __future__ import annotations

import numpy as np

__all__ = ["ALIGNMENT", "aligned_empty", "is_aligned"]

# Bytes: Eigen's largest alignment (AVX-512). TensorFlow reads a buffer it is handed
# through DLPack in place only at this alignment, and aborts the process otherwise.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at an ``ALIGNMENT`` boundary.

    Why: NumPy only promises 16 bytes, so a batch handed to TensorFlow without a copy
    (:func:`pipeline.bases.model.FeatureModel`) must be allocated this way.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def is_aligned(x: np.ndarray) -> bool:
    """Whether ``x`` is C-contiguous and starts at an ``ALIGNMENT`` boundary."""
    return bool(x.flags.c_contiguous) and x.ctypes.data % ALIGNMENT == 0
