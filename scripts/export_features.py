"""Thin wrapper: see `python scripts/export_features.py --help` and pipeline/cli.py."""

import sys
from pathlib import Path

# Runs from a checkout without installation too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import export_features_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(export_features_main())
