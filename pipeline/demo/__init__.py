"""The offline demo (``make demo``): bottleneck features on real handwritten digits.

    data    scikit-learn's digits as PNGs in the pre-split layout; a split loaded as extract
            decodes it
    train   the base pretrained on digits 0-4; the from-scratch baseline
    run     run_demo: the commands a user would type, in order, and the table
"""

from pipeline.demo.data import PRETRAIN_DIGITS, TASK_DIGITS, load_split, write_digits
from pipeline.demo.run import HEADS, DemoResult, DemoSchedule, demo_schedule, format_table, run_demo
from pipeline.demo.train import pretrain_base, scratch_convnet

__all__ = [
    "HEADS",
    "PRETRAIN_DIGITS",
    "TASK_DIGITS",
    "DemoResult",
    "DemoSchedule",
    "demo_schedule",
    "format_table",
    "load_split",
    "pretrain_base",
    "run_demo",
    "scratch_convnet",
    "write_digits",
]
