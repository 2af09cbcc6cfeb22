"""The benchmark of the pipeline, outside the installed package (``python scripts/bench.py``)."""
