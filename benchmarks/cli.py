"""The benchmark's command line: ``python scripts/bench.py [--quick] [--repeats R] [--images N]``.

Prints the tables and writes the raw numbers to ``--out`` (JSON). docs/performance.md
reports a full run.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from benchmarks.bench import CASES, BenchConfig, format_report, run_benchmark
from pipeline.util.quiet import load_backend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PARTS = BenchConfig().parts


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """``BenchConfig`` from the command line (``--quick``: 32 images, 1 repeat)."""
    p = argparse.ArgumentParser(prog="bench.py", description="Benchmark the pipeline.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32 images, 1 repeat, small secondary grids")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (median); 3")
    p.add_argument("--images", type=int, default=None, help="JPEGs to extract (default 384)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="decode threads for extract (0: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/bench", help="where images and scratch files go")
    p.add_argument("--out", default="reports/bench.json", help="raw numbers (JSON)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                   help=f"run only these parts: {' '.join(PARTS)}")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES],
                   default=[c.name for c in CASES if c.default], metavar="CASE",
                   help=f"feature models: {' '.join(c.name for c in CASES)} (default: all "
                   "but resnet50, which is for the GPU box)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="GPU box: run every base in mixed_float16 (as extract --mixed-precision)")
    p.add_argument("--jit", default="auto", choices=("auto", "on", "off"),
                   help="XLA for the forward pass (as extract --jit)")
    p.add_argument("--fold-batchnorm", default="on", choices=("on", "off"),
                   help="as extract --fold-batchnorm; c and d (the Keras user's code) always "
                   "run the base unfolded, and a' is also timed unfolded")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU box's run (issue 15), ~5 minutes: 10,000 JPEGs, batch 256, "
                   "MobileNetV2@224 and ResNet50@224, parts throughput, input, feed and precision "
                   "(float32 / float16 / bfloat16 at 224 px), 1 repeat, "
                   "no naive loop; each of these can still be set")
    args = p.parse_args(argv)
    if args.gpu:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        args.batch_size = args.batch_size if "--batch-size" in given else 256
        if "--cases" not in given:
            args.cases = ["mobilenetv2@224-avg", "resnet50@224-avg"]
        if "--only" not in given:
            args.only = ["throughput", "input", "feed", "precision"]
    images = args.images or (32 if args.quick else 10_000 if args.gpu else 384)
    repeats = args.repeats or (1 if args.quick or args.gpu else 3)
    if images < 10 or repeats < 1 or args.batch_size < 1:
        p.error(f"need --images >= 10, --repeats >= 1, --batch-size >= 1. Received: "
                f"images={images}, repeats={repeats}, batch_size={args.batch_size}")
    return BenchConfig(images=images, repeats=repeats, quick=args.quick,
                       batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                       data=args.data, out=args.out, parts=tuple(args.only),
                       cases=tuple(args.cases), mixed_precision=args.mixed_precision,
                       jit=args.jit, fold_batchnorm=args.fold_batchnorm, gpu=args.gpu)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, write the JSON."""
    config = parse_args(argv)
    # Keras is loaded here, without TensorFlow's start-up lines, which would otherwise sit
    # in the middle of the report (pipeline/util/quiet.py). Not at import: the decode
    # workers are spawned, and a spawned process imports this module again (as the main
    # script's), so a top-level load cost every worker a TensorFlow import (~5 core-s).
    load_backend()
    # Keras' retracing warnings: every case builds new models, on purpose.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    results = run_benchmark(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(results))
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nbench: raw numbers in {out} (config: {dataclasses.asdict(config)})")
    return 0

