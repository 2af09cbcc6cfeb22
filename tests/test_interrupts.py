"""Ctrl-C stops every command with one line "interrupted" and exit 130, wherever it lands.

Python's own Ctrl-C is lost when it lands in a garbage-collector callback (JAX has one):
"Exception ignored in: <function _xla_gc_callback>", and the run goes on to exit 0. Here a
gc callback of the test sends the signal (conftest.ctrl_c_in_a_gc_callback), so the
interrupt lands there every time.
"""

from __future__ import annotations

import gc
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    ROOT,
    SCRIPTS,
    ctrl_c_in_a_gc_callback,
    popen_interruptible,
    write_index_images,
)

from pipeline import interrupts
from pipeline.cache import partial_path, read_cache
from pipeline.interrupts import Interrupted, Terminated, checkpoint, deferred, guard
from pipeline.progress import Progress


@pytest.fixture(autouse=True)
def sigint_as_ctrl_c():
    """Python's own Ctrl-C handler, even when pytest runs as a background job (SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_gc_callback_is_raised_at_the_next_checkpoint(monkeypatch):
    monkeypatch.setattr(interrupts, "REDELIVER_AFTER", 60.0)  # only the checkpoint raises
    progress = Progress(10, "test", stream=io.StringIO())
    with guard(), pytest.raises(Interrupted) as caught:
        with ctrl_c_in_a_gc_callback() as fired:
            gc.collect()
        assert fired, "the callback ran and sent the signal"
        progress.update()
    assert caught.value.exit_code == 130 and progress.done == 1


def test_ctrl_c_in_a_gc_callback_stops_work_without_checkpoints():
    """Delivered again once the callback has returned: a long fit stops within moments."""
    start = time.monotonic()
    with guard(), pytest.raises(Interrupted):
        with ctrl_c_in_a_gc_callback():
            gc.collect()
        while time.monotonic() - start < 10:
            time.sleep(0.01)
    assert time.monotonic() - start < 5


def test_deferred_section_stops_at_its_end_and_a_second_ctrl_c_at_once():
    finished = []
    with guard(), pytest.raises(Interrupted):
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("section")
        finished.append("after the section")
    assert finished == ["section"]
    with guard(), pytest.raises(Interrupted), deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        finished.append("after the second Ctrl-C")
    assert finished == ["section"]


def test_ctrl_c_in_plain_code_raises_at_once_and_checkpoints_are_cheap():
    reached = []
    with guard(), pytest.raises(Interrupted):
        checkpoint()  # nothing recorded: nothing happens
        os.kill(os.getpid(), signal.SIGINT)
        reached.append(True)
    assert not reached


def test_guard_restores_the_handler_and_leaves_an_ignored_sigint_ignored():
    before = signal.getsignal(signal.SIGINT)
    with guard():
        assert signal.getsignal(signal.SIGINT) is not before
        with guard():  # nested (demo runs extract in-process): the outer one stays
            inner = signal.getsignal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is inner
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with guard():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_is_terminated_with_143():
    previous = interrupts.install_sigterm()
    try:
        with pytest.raises(Terminated) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        interrupts.restore_sigterm(previous)
    assert caught.value.exit_code == 143 and isinstance(caught.value, Interrupted)


def _interrupted_in_gc(*args, **kwargs):
    """Stands in for a command's work: Ctrl-C lands in a gc callback, then work goes on."""
    with ctrl_c_in_a_gc_callback():
        gc.collect()
    time.sleep(3)
    raise AssertionError("the work went on after Ctrl-C")


@pytest.mark.parametrize("script, module, function, argv", [
    ("fit_head", "pipeline.fit", "run_fit", ["c.h5"]),
    ("predict", "pipeline.predict", "run_predict", ["model", "x.png"]),
    ("finetune", "pipeline.finetune", "run_finetune", ["c.h5", "--unfreeze-top-blocks", "1"]),
    ("compare", "pipeline.compare", "run_compare", ["c.h5"]),
    ("demo", "pipeline.demo", "run_demo", []),
])
def test_every_command_says_interrupted_and_exits_130(monkeypatch, capsys, tmp_path, script,
                                                      module, function, argv):
    import importlib

    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.h5").touch()  # fit_head checks the cache exists before loading anything
    monkeypatch.setattr(importlib.import_module(module), function, _interrupted_in_gc)
    assert getattr(cli, f"{script}_main")(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"{script}: interrupted by Ctrl-C."
    assert not any("Traceback" in line or "Exception ignored" in line for line in err)


CHILD = """
import gc, sys
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import pipeline.extract.run as extract
from conftest import ctrl_c_in_a_gc_callback
from pipeline.cli import extract_main

real_build_model = extract.build_model


def build_model(*args, **kwargs):
    # Ctrl-C lands in a gc callback while the base is built, as it does in JAX's.
    with ctrl_c_in_a_gc_callback():
        model = real_build_model(*args, **kwargs)
        gc.collect()
    return model


extract.build_model = build_model
sys.exit(extract_main(sys.argv[1:]))
"""


def test_ctrl_c_during_model_build_exits_130_and_loses_nothing(tmp_path, probe_model):
    from test_extract import check_alignment, probe_config

    from pipeline.extract import run_extract

    data = tmp_path / "data"
    expected = write_index_images(data, 20)
    out = tmp_path / "c.h5"
    proc = popen_interruptible(
        [PYTHON, "-c", CHILD.format(root=str(ROOT)), str(data), "--base", str(probe_model),
         "--pooling", "avg", "--preprocess", "none", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "extract: interrupted by Ctrl-C; no cache was written yet. Run the same command "
        "again to start.")
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "extract: done" not in stdout
    assert not out.exists() and not partial_path(out).exists()
    run_extract(probe_config(data, probe_model, out))  # the same command again
    check_alignment(out, expected, ["a", "b", "c"])


# The real script, the real base: Ctrl-C at moments from interpreter start-up to the
# batch loop (on 2 busy cores: imports until ~5 s, model build until ~8 s).
@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> tuple[Path, list[str]]:
    data = tmp_path_factory.mktemp("interrupts") / "data"
    return data, sorted(write_index_images(data, 1500))


def _extract_script(data: Path, out: Path) -> list[str]:
    return [PYTHON, str(SCRIPTS / "extract.py"), str(data), "--base", "mobilenetv2",
            "--weights", "none", "--input-size", "32", "--batch-size", "8",
            "--out", str(out), "--log-every", "0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
def test_ctrl_c_at_any_moment_of_the_script(tmp_path, many_images, delay):
    data, paths = many_images
    out = tmp_path / "c.h5"
    proc = popen_interruptible(_extract_script(data, out), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("extract: interrupted by Ctrl-C; ") and "again" in last, text
    assert "Traceback" not in text and "Exception ignored" not in text
    assert not out.exists()
    resumed = subprocess.run(_extract_script(data, out), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(read_cache(out).paths) == paths


@pytest.mark.slow
def test_a_second_ctrl_c_during_model_build_stops_at_once(tmp_path, many_images):
    data, _ = many_images
    proc = popen_interruptible(_extract_script(data, tmp_path / "c.h5"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for TensorFlow: the model is being built
        lines.append(line)
        if "cuda" in line.lower() or "oneDNN" in line:
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    text = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text
    assert time.monotonic() - start < 3
    assert "stopping at the next safe point" in text
    assert text.strip().splitlines()[-1].startswith("extract: interrupted by Ctrl-C; ")

