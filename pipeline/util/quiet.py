"""Load the Keras backend without the start-up lines TensorFlow's C++ side prints.

TensorFlow 2.19+ writes a few lines to file descriptor 2 while its libraries load and when
the CUDA platform is first asked for devices (``WARNING: All log messages before
absl::InitializeLog() ...``, ``cudart_stub.cc ... Could not find cuda drivers``,
``E0000 ... failed call to cuInit``). ``TF_CPP_MIN_LOG_LEVEL`` does not reach them: they are
printed before TensorFlow's logger reads it. On a CPU box they look like failures and break
a progress bar, so the import runs with descriptor 2 pointed at a file, and what it caught
is written back afterwards without the lines known to be start-up noise. Anything else
(an ImportError's message, a real CUDA error on a machine that has an NVIDIA driver) is
shown as it came.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["NOISE", "filtered_stderr", "is_noise", "load_backend", "quiet_tensorflow"]

# The lines TensorFlow prints while it starts, none of which asks anything of the user.
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR"
    # absl INFO and WARNING lines: I0000 00:00:1796310234.754525     633 port.cc:153] ...
    r"|[IW]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] .*"
    # the continuation of cpu_feature_guard's INFO line
    r"|To enable the following instructions: .*"
    r")$"
)
# Only noise on a machine without an NVIDIA driver: with one, it is the reason the GPU is
# not used, and is kept.
_NO_CUDA = re.compile(r"^E\d{4} [\d:.]+\s+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit: .*$")


def is_noise(line: str, *, has_driver: bool | None = None) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up lines that need no action.

    Args:
        line: one line of what TensorFlow wrote to stderr, without its newline.
        has_driver: whether an NVIDIA driver is present (default: ``/dev/nvidiactl``
            exists); a failed ``cuInit`` is only noise without one.
    """
    if NOISE.match(line):
        return True
    if has_driver is None:
        has_driver = Path("/dev/nvidiactl").exists()
    return not has_driver and bool(_NO_CUDA.match(line))


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Within the block, what is written to file descriptor 2 (by C++ or Python) is held
    back, then written to stderr without the lines :func:`is_noise` names.

    ``TF_CPP_MIN_LOG_LEVEL=0`` turns the filter off: everything is shown as it comes.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    has_driver = Path("/dev/nvidiactl").exists()  # once, not once per line
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines()
                    if not is_noise(line, has_driver=has_driver)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


_DEVICES_LISTED = False  # TensorFlow's platforms initialised, quietly, in this process


def quiet_tensorflow() -> Any:
    """``import tensorflow`` and list its devices, without the start-up lines, in any process
    (the CLI's, a decode or compare worker's). Returns the module.

    The devices are listed here because that is where a failed ``cuInit`` is printed: left
    to the first operation, it would come in the middle of a run. Keras importing
    TensorFlow does not list them, so "tensorflow is imported" is not "done".
    """
    global _DEVICES_LISTED
    if not _DEVICES_LISTED:  # decoders call this per image: after the first, only a lookup
        with filtered_stderr():
            import tensorflow as tf

            tf.config.list_physical_devices()
        _DEVICES_LISTED = True
    import tensorflow as tf

    return tf


def load_backend() -> str:
    """Import Keras and its backend, and initialise TensorFlow's devices when it is the
    backend, without start-up noise.

    Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything TensorFlow prints. Returns the name of
    the backend Keras uses.
    """
    with filtered_stderr():
        import keras

        backend = keras.backend.backend()
    if backend == "tensorflow":
        quiet_tensorflow()
    return backend
