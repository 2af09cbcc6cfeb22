"""Thin wrapper: see `python scripts/finetune.py --help` and pipeline/cli.py."""

import sys
from pathlib import Path

# Runs from a checkout without installation too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import finetune_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(finetune_main())
