"""Train one head on a feature cache, evaluate it, and save model + metrics + config.

- ``config``: ``FitConfig`` (what was asked) and its checks, which need neither Keras nor
  scikit-learn, so that a bad argument is refused at once;
- ``run``: ``run_fit`` (read, split, fit, score, save), ``split_rows`` (shared with compare
  and finetune), the report.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py).
_HOMES = {
    "FitConfig": "pipeline.fit.config",
    "TEST_ROWS": "pipeline.fit.run",
    "check_fit_config": "pipeline.fit.config",
    "default_out": "pipeline.fit.config",
    "evaluate": "pipeline.fit.run",
    "format_done": "pipeline.fit.run",
    "format_report": "pipeline.fit.run",
    "run_fit": "pipeline.fit.run",
    "split_rows": "pipeline.fit.run",
}

__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
