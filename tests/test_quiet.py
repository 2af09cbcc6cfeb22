"""TensorFlow's start-up lines stay out of a command's output; everything else stays in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PYTHON, SCRIPTS

from pipeline.util.quiet import filtered_stderr, is_noise

# As TensorFlow 2.21 prints them on a CPU machine (2026-12).
_STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796310234.754525     633 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1796310234.759162     633 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796310249.327663    1097 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "W0000 00:00:1796310249.327663    1097 gpu_device.cc:2342] Cannot dlopen some GPU libraries.",
]
_CUINIT = ("E0000 00:00:1796310239.848196     633 cuda_platform.cc:52] failed call to cuInit: "
           "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")


@pytest.mark.parametrize("line", _STARTUP)
def test_startup_lines_are_noise(line):
    assert is_noise(line, has_driver=True)


def test_a_failed_cuinit_is_kept_where_there_is_a_driver():
    assert is_noise(_CUINIT, has_driver=False)
    assert not is_noise(_CUINIT, has_driver=True)


@pytest.mark.parametrize("line", [
    "E0000 00:00:1796310239.848196     633 some_kernel.cc:52] Out of memory",
    "Traceback (most recent call last):",
    "ImportError: libcudnn.so.9: cannot open shared object file",
    "2026-12-03 15:04:00 extract: starting; 12 images to do",
])
def test_other_lines_are_not(line):
    assert not is_noise(line, has_driver=False)


def test_filtered_stderr_holds_back_only_the_noise(capfd):
    with filtered_stderr():
        os.write(2, ("\n".join(_STARTUP) + "\nreal trouble from C++\n").encode())
        print("and from Python", file=sys.stderr)
    # (pytest's capture sends Python's line past descriptor 2, so the order is not checked)
    assert sorted(capfd.readouterr().err.splitlines()) == ["and from Python",
                                                           "real trouble from C++"]


def test_filtered_stderr_shows_what_came_before_an_error(capfd):
    with pytest.raises(ImportError), filtered_stderr():
        os.write(2, f"{_STARTUP[0]}\nlibfoo.so: cannot open\n".encode())
        raise ImportError("no foo")
    assert capfd.readouterr().err == "libfoo.so: cannot open\n"


def test_a_command_prints_no_tensorflow_startup_lines(tmp_path):
    """fit_head's dense head loads Keras and runs TensorFlow (which, imported plainly, prints
    its start-up lines on this machine, and a failed cuInit at its first operation): none of
    them reaches the user."""
    from helpers_fit import blobs, make_cache

    X, y = blobs(n_per_class=6, n_classes=2, shape=(4,))
    cache = make_cache(tmp_path / "c.h5", X, y)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([PYTHON, str(SCRIPTS / "fit_head.py"), str(cache), "--head", "dense",
                           "--epochs", "2", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stderr.splitlines():
        assert not is_noise(line), line
    for marker in ("absl::InitializeLog", "cudart_stub", "cuInit"):
        assert marker not in proc.stderr


def test_a_compare_worker_task_unpickles_without_keras():
    """joblib workers unpickle their task first: that must not load TensorFlow (whose
    start-up lines would then print once per worker); the task loads it quietly."""
    proc = subprocess.run([PYTHON, "-c", "import sys, pickle; from pipeline.compare.worker "
                           "import numbered_fit; pickle.loads(pickle.dumps(numbered_fit)); "
                           "print('keras' in sys.modules, 'tensorflow' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False False", proc.stdout + proc.stderr[-2000:]
