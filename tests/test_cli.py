"""CLI: bad input -> non-zero exit, one clear message, no traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, SCRIPTS, write_index_images

from pipeline.cli import extract_main


@pytest.fixture
def data(tmp_path):
    write_index_images(tmp_path / "data", 4)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "args, message",
    [
        # from the library, its parameter named as the flag the user typed
        (["--base", "vgg17"], "Received: --base='vgg17'"),
        (["--base", "vgg16", "--batch-size", "0"], "`--batch-size` must be >= 1. "
         "Received: --batch-size=0"),
        (["--base", "vgg16", "--input-size", "big"], "Received: --input-size='big'"),
        # from argparse, in the same form
        (["--base", "vgg16", "--pooling", "median"], "`--pooling` must be one of flatten, avg, "
         "max, none, cls, mean, cls+mean. Received: --pooling='median'"),
        (["--base", "vgg16", "--dtype", "int8"], "Received: --dtype='int8'"),
        (["--base", "vgg16", "--interpolation", "cubic"], "Received: --interpolation='cubic'"),
        (["--base", "vgg16", "--batch-size", "x"], "`--batch-size` must be an integer. "
         "Received: --batch-size='x'"),
        (["--base", "vgg16", "--input_size", "32"], "unrecognized arguments: --input_size 32. "
         "Did you mean --input-size?"),
    ],
)
def test_bad_arguments(data, capsys, args, message):
    assert extract_main([str(data), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_missing_and_empty_folders(tmp_path, capsys):
    assert extract_main([str(tmp_path / "nope"), "--base", "vgg16"]) == 2
    assert "Received: DATA_DIR=" in capsys.readouterr().err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert extract_main([str(tmp_path / "empty"), "--base", "vgg16"]) == 2
    assert "Found 0 images" in capsys.readouterr().err


def test_script_reports_one_line_without_traceback(data, tmp_path):
    proc = subprocess.run(
        [PYTHON, str(SCRIPTS / "extract.py"), str(data), "--base", "vgg16", "--pooling", "median"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: `--pooling` must be one of")
    assert "Traceback" not in proc.stderr
    help_proc = subprocess.run([PYTHON, str(SCRIPTS / "extract.py"), "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_proc.returncode == 0 and "--pooling" in help_proc.stdout


def test_fit_head_errors_are_one_line(tmp_path, capsys):
    from helpers_fit import blobs, make_cache

    from pipeline.cli import fit_head_main

    X, y = blobs(n_per_class=10, n_classes=2, shape=(4,))
    cache = make_cache(tmp_path / "c.h5", X, y)
    assert fit_head_main([str(cache), "--head", "forest"]) == 2
    assert "Received: --head='forest'" in capsys.readouterr().err
    assert fit_head_main([str(tmp_path / "missing.h5")]) == 2
    assert "Cache file not found" in capsys.readouterr().err
    out = tmp_path / "m"
    assert fit_head_main([str(cache), "--head", "logreg", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fit_head: done.") and str(out) in last


def _main(script: str):
    from pipeline import cli

    return getattr(cli, f"{script}_main")


# Every --out, checked before any work: the message names the flag as typed and its value.
@pytest.mark.parametrize("script, argv, kind", [
    ("extract", ["{data}", "--base", "vgg16"], "file"),
    ("fit_head", ["{tmp}/c.h5"], "folder"),
    ("predict", ["{tmp}/model", "{data}"], "file"),
    ("compare", ["{tmp}/c.h5"], "folder"),
    ("finetune", ["{tmp}/c.h5"], "folder"),
])
@pytest.mark.parametrize("problem", ["wrong kind", "below a file", "proc"])
def test_unusable_out_is_named_before_any_work(data, tmp_path, capsys, script, argv, kind,
                                               problem):
    folder, a_file = tmp_path / "outdir", tmp_path / "notes.txt"
    folder.mkdir()
    a_file.write_text("a file")
    if problem == "wrong kind":
        out = f"{folder}/" if kind == "file" else str(a_file)
        why = (f"`--out` must name a file, but {out} is a folder." if kind == "file" else
               f"`--out` must name a folder, but {out} is a file.")
    elif problem == "below a file":
        out = str(a_file / "out")
        why = f"`--out` cannot be created: {a_file} is a file, not a folder."
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = "/proc/nope"
        why = "`--out` cannot be written: no file can be created in /proc (virtual file system)."
    values = {"data": data, "tmp": tmp_path}
    assert _main(script)([a.format(**values) for a in argv] + ["--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {why}"), err[-1]
    assert err[-1].endswith(f"Received: --out={out!r}")
    assert not any("Traceback" in line for line in err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_folder_without_write_permission(data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert extract_main([str(data), "--base", "vgg16", "--out", str(locked / "c.h5")]) == 2
    finally:
        locked.chmod(0o700)
    assert f"no file can be created in {locked} (permission denied)" in capsys.readouterr().err


def test_check_output_leaves_nothing_behind(tmp_path):
    from pipeline.cli import check_output

    check_output("--out", str(tmp_path / "new" / "deeper" / "c.h5"))
    check_output("--out", str(tmp_path / "models" / "m"), folder=True)
    check_output("--out", None)
    assert list(tmp_path.iterdir()) == []


_WITHOUT_KERAS = """
import sys
from pipeline import cli
rc = getattr(cli, sys.argv[1])(sys.argv[2:])
heavy = sorted(m for m in ("keras", "tensorflow", "sklearn") if m in sys.modules)
print(rc, ",".join(heavy))
"""


@pytest.mark.parametrize("main, argv, rc, said", [
    ("fit_head_main", ["nope.h5"], 2, "Cache file not found"),
    ("compare_main", ["--history", "--history-file", "none.jsonl"], 0, ""),
    # every argument is checked before Keras loads, in each command
    ("fit_head_main", ["c.h5", "--val-split", "2"], 2, "Received: --val-split=2.0"),
    ("fit_head_main", ["c.h5", "--head", "knn", "--k", "0"], 2, "Received: --k=0"),
    ("fit_head_main", ["c.h5", "--head", "svm", "--stream"], 2, "Received: --head='svm'"),
    ("compare_main", ["c.h5", "--cv", "1"], 2, "Received: --cv=1"),
    ("finetune_main", ["c.h5", "--unfreeze-top-blocks", "1", "--epochs", "0"], 2,
     "Received: --epochs=0"),
    ("extract_main", ["data", "--base", "vgg16", "--augment", "-1"], 2, "Received: --augment=-1"),
    ("extract_main", ["data", "--base", "vgg16", "--shard", "2/2"], 2, "Received: --shard='2/2'"),
])
def test_quick_answers_load_neither_keras_nor_tensorflow(tmp_path, main, argv, rc, said):
    """A missing cache, the compare history and every bad argument are answered before
    TensorFlow loads (it takes ~8 s on 2 cores), so a typo fails at once."""
    (tmp_path / "c.h5").touch()
    proc = subprocess.run([PYTHON, "-c", _WITHOUT_KERAS, main, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[-2] == f"{rc} ", proc.stdout + proc.stderr[-2000:]
    assert said in proc.stderr


def test_library_names_become_flags_as_typed():
    from pipeline.cli import _as_typed, fit_head_parser

    parser = fit_head_parser()
    said = _as_typed("`max_iter` must be >= 1, and `C` > 0. Received: max_iter=0, C=-1, "
                     "cache='x.h5', other=3", parser)
    assert said == ("`--max-iter` must be >= 1, and `--C` > 0. Received: --max-iter=0, --C=-1, "
                    "CACHE='x.h5', other=3")
    # words before "Received:" that are not in backticks stay as written
    assert _as_typed("the head=logreg fit", parser) == "the head=logreg fit"


def _run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", "import sys; from pipeline.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *argv],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_one_entry_point_runs_every_command():
    from pipeline import __version__
    from pipeline.cli import COMMANDS

    proc = _run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"bottleneck {__version__} (Keras ")
    proc = _run_cli("--help")
    assert proc.returncode == 0 and all(f"  {name} " in proc.stdout for name in COMMANDS)
    proc = _run_cli()
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: name a command.")
    proc = _run_cli("fitt", "x.h5")
    assert proc.returncode == 2
    assert "Did you mean 'fit'?" in proc.stderr and "Received: 'fitt'" in proc.stderr
    for name in COMMANDS:
        proc = _run_cli(name, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: bottleneck {name} "), proc.stdout[:200]
        assert f"examples:\n  bottleneck {name} " in proc.stdout
    proc = _run_cli("fit-head", "--help")  # the script's name works too
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bottleneck fit ")
    # without the console script
    proc = subprocess.run([PYTHON, "-m", "pipeline", "compare", "c.h5", "--cv", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: python -m pipeline compare CACHE.h5 [options]")


def test_help_shows_choices_and_defaults():
    from pipeline.cli import extract_parser, fit_head_parser

    text = " ".join(extract_parser().format_help().split())
    assert text.startswith("usage: extract.py DATA_DIR [options]")
    assert "--decode {auto,threads,processes}" in text
    assert "--seed SEED (default: 0)" in text
    assert "--batch-size BATCH_SIZE (default: 32)" in text
    assert "examples: extract.py data/digits/task --base mobilenetv2" in text
    fit = " ".join(fit_head_parser("bottleneck fit").format_help().split())
    assert "--head {dense,logreg,linear-svm,svm,knn}" in fit and "(default: logreg)" in fit
    # a help that names its own default is not given a second one
    assert fit.count("(default: models/<cache>-<head>)") == 1 and "(default: None)" not in fit


def test_usage_names_the_command_that_was_run(data):
    proc = subprocess.run([PYTHON, str(SCRIPTS / "fit_head.py"), "nope.h5", "--head", "tree"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    usage, error = proc.stderr.strip().splitlines()
    assert usage == "usage: fit_head.py CACHE [options]   (fit_head.py --help: every option)"
    assert error.startswith("error: `--head` must be one of dense, logreg")
    proc = _run_cli("compare")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bottleneck compare CACHE.h5")


_HELP_WITHOUT_KERAS = """
import sys
from pipeline import cli
for name in ("extract", "fit_head", "predict", "finetune", "compare", "export_features", "demo"):
    getattr(cli, name + "_parser")().format_help()
print(",".join(sorted(m for m in ("keras", "tensorflow", "sklearn") if m in sys.modules)))
"""


def test_help_and_choices_load_no_keras():
    """The allowed values come from the library (one source), without importing Keras."""
    proc = subprocess.run([PYTHON, "-c", _HELP_WITHOUT_KERAS], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr[-2000:]
