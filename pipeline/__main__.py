"""``python -m pipeline <command> ...``: the ``bottleneck`` command without its console script."""

import sys

from pipeline.cli import main

sys.exit(main(prog="python -m pipeline"))
