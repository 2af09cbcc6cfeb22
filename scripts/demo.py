"""Thin wrapper (`make demo`): see `python scripts/demo.py --help` and pipeline/cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import demo_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(demo_main())
