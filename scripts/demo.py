"""`make demo`: the offline end-to-end demo on handwritten digits (see pipeline/demo.py)."""

import sys
from pathlib import Path

# Run from a clone without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
