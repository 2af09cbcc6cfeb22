"""How much the Keras peer (c) varies from run to run in one process.

``python -m benchmarks.peer_spread [--images N] [--runs R]``: the input-bound case's peer
(``image_dataset_from_directory`` + ``preprocess_input`` + ``predict``, unfolded model) R
times, then once at 224 px, then R times again, each run's img/s printed. Why: b ÷ c in
docs/performance.md moved between 0.98 and 1.21 across runs while b moved by a few per cent;
this shows the peer's own spread.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Print the peer's img/s per run (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_spread")
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default="data/bench")
    args = parser.parse_args(argv)

    from pipeline.util.quiet import load_backend

    load_backend()
    from benchmarks.common import CASES, make_images
    from benchmarks.throughput import build_case_model, keras_peer_seconds

    cases = {c.name: c for c in CASES}
    small, big = cases["mobilenetv2@96-block_3_expand-avg"], cases["mobilenetv2@224-avg"]
    data = Path(args.data) / f"images-{args.images}"
    make_images(data, args.images)
    out = Path(args.data) / "peer_spread.npy"

    def peer(case: object, model: object, label: str) -> None:
        seconds = keras_peer_seconds(data, case, model, out, 32)
        print(f"{label}: {args.images / seconds:.0f} img/s", flush=True)

    model = build_case_model(small, plain=True).model
    peer(small, model, "96 px, warm-up")
    for _ in range(args.runs):
        peer(small, model, "96 px")
    peer(big, build_case_model(big, plain=True).model, "224 px")
    for _ in range(args.runs):
        peer(small, model, "96 px, after 224 px")


if __name__ == "__main__":
    main()
