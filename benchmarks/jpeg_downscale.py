"""``extract --jpeg-downscale dct`` against the exact path (``off``), side by side in one run.

    python -m benchmarks.jpeg_downscale [--images 200] [--repeats 5]
        [--parts speed rule pixels extract accuracy]

speed     core-ms per image of what extract does per file (read, header, sha256, decode,
          resize into a batch slot: :func:`pipeline.images.read_image`), off and dct
          interleaved ``repeats`` times (median), at 96 and 224 px, on the benchmark's
          JPEGs (500x375 q90, :func:`benchmarks.common.make_images`) and on 2x and 4x
          upscaled copies of them (1000x750, 2000x1500: photos larger than ImageNet's)
rule      the choice behind dct's rule, made with the kernels alone: decode at the strongest
          1/2, 1/4, 1/8 keeping the decoded image >= the input size (K=1, what dct does)
          or >= 2x it (K=2, more of the downscale left to the bilinear kernel); core-ms of
          decode + resize, |x - off| and the distance to the box reference of each
pixels    |dct - off| in levels (mean, max, mean signed per channel), and each path's mean
          distance to an antialiased reference (a box filter of libjpeg's accurate decode):
          which of the two is the better downscale
extract   run_extract img/s, off and dct alternated (median of 4 after a warm-up round), in
          the issue's input-bound case (MobileNetV2 cut at block_3_expand, random weights,
          96 px, avg) on the 500x375 and the 2000x1500 JPEGs; and the core-ms per image
          of each whole run (model build included), whose difference is dct's saving
accuracy  a head's accuracy on features of each path: 6 classes (the left and right halves
          of the 3 photographs bundled offline: scikit-learn's china and flower,
          matplotlib's grace_hopper), random crops saved like make_images; features of a
          randomly initialised MobileNetV2 (no pretrained weights offline); logistic
          regression, the same 5 stratified folds for both paths, and the head trained on
          one path scored on the other (what predict would do if it ignored the cache's
          record)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import IMAGE_SIZE, make_images

MODES = ("off", "dct")
SIZES = (96, 224)


def photo_sets(folder: Path, n: int) -> dict[str, list[Path]]:
    """The benchmark's JPEGs and upscaled copies (half and a fifth as many), made once."""
    from PIL import Image

    bench = make_images(folder / "bench", n)
    sets = {"500x375": bench}
    for factor, count in ((2, n // 2), (4, n // 5)):
        paths = []
        for src in bench[:count]:
            path = folder / f"x{factor}" / src.parent.name / src.name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(src) as im:
                    im.resize((im.width * factor, im.height * factor),
                              Image.Resampling.BICUBIC).save(path, quality=90)
            paths.append(path)
        sets[f"{IMAGE_SIZE[1] * factor}x{IMAGE_SIZE[0] * factor}"] = paths
    return sets


def _core_ms(paths: Sequence[Path], size: tuple[int, int], mode: str) -> float:
    """CPU ms per image of read_image into one reused slot (as a batch slot is)."""
    from pipeline.images import read_image

    out = np.empty((*size, 3), np.float32)
    start = time.process_time()
    for path in paths:
        read_image(path, size, out=out, jpeg_downscale=mode)
    return 1e3 * (time.process_time() - start) / len(paths)


def _reductions(paths: Sequence[Path], size: tuple[int, int]) -> list[int]:
    """The 1/d each file is decoded at under dct (1: full size)."""
    from pipeline.images.formats import jpeg_header
    from pipeline.images.kernels import dct_reduction

    out = []
    for path in paths:
        header = jpeg_header(path.read_bytes())
        out.append(dct_reduction(header.height, header.width, size))
    return out


def measure_speed(sets: dict[str, list[Path]], *, repeats: int) -> list[dict[str, Any]]:
    """Per set and size: median core-ms per image of each mode, and off / dct."""
    rows = []
    for name, paths in sets.items():
        for side in SIZES:
            size = (side, side)
            for mode in MODES:  # untimed warm-up: file cache, resize plans
                _core_ms(paths, size, mode)
            runs: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(repeats):
                for mode in MODES:
                    runs[mode].append(_core_ms(paths, size, mode))
            med = {mode: statistics.median(v) for mode, v in runs.items()}
            d = _reductions(paths, size)
            rows.append({"set": name, "size": side, "n": len(paths),
                         "reduced": sorted({f"1/{v}" for v in d if v > 1}) or ["none"],
                         **{f"{mode}_core_ms": med[mode] for mode in MODES},
                         "speedup": med["off"] / med["dct"]})
    return rows


def _reduced(data: bytes, size: tuple[int, int], keep: int,
             out: np.ndarray) -> np.ndarray:
    """Decode at the strongest 1/d keeping ``keep`` x ``size``, resize to ``size`` (what
    dct does for keep=1, without EXIF: the benchmark's JPEGs have none)."""
    from pipeline.images.formats import jpeg_header
    from pipeline.images.kernels import dct_reduction, decode_jpeg, resize_bilinear

    header = jpeg_header(data)
    h, w = header.height, header.width
    d = dct_reduction(h, w, (keep * size[0], keep * size[1]))
    if d == 1:
        return resize_bilinear(decode_jpeg(data), size, out)
    return resize_bilinear(decode_jpeg(data, (-(-h // d), -(-w // d))), size, out,
                           (0.0, 0.0, h / d, w / d))


def measure_rule(sets: dict[str, list[Path]], *, repeats: int) -> list[dict[str, Any]]:
    """K=1 against K=2 (module docstring): speed over off's, pixels against off's."""
    rows = []
    for name, paths in sets.items():
        data = [p.read_bytes() for p in paths]
        for side in SIZES:
            size = (side, side)
            out = np.empty((*size, 3), np.float32)
            runs: dict[int, list[float]] = {0: [], 1: [], 2: []}  # 0: no reduction (off)
            for _ in range(repeats + 1):  # the first round is a warm-up
                for keep in runs:
                    start = time.process_time()
                    for d in data:
                        _reduced(d, size, keep if keep else 1 << 20, out)
                    runs[keep].append(1e3 * (time.process_time() - start) / len(data))
            ms = {k: statistics.median(v[1:]) for k, v in runs.items()}
            images = {k: np.stack([_reduced(d, size, k if k else 1 << 20,
                                            np.empty((*size, 3), np.float32)) for d in data])
                      for k in runs}
            ref = np.stack([_box_reference(d, size) for d in data])
            row: dict[str, Any] = {"set": name, "size": side, "off_ms": ms[0]}
            for k in (1, 2):
                diff = np.abs(images[k] - images[0])
                row.update({f"K{k}_ms": ms[k], f"K{k}_speedup": ms[0] / ms[k],
                            f"K{k}_mean_abs": float(diff.mean()),
                            f"K{k}_to_box": float(np.abs(images[k] - ref).mean())})
            row["off_to_box"] = float(np.abs(images[0] - ref).mean())
            rows.append(row)
    return rows


def _box_reference(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """An antialiased downscale: a box filter (area average) of libjpeg's accurate
    (islow) decode, in float, per channel."""
    import simplejpeg
    from PIL import Image

    full = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    return np.stack([np.asarray(Image.fromarray(full[..., c].astype(np.float32), mode="F")
                                .resize(size[::-1], Image.Resampling.BOX))
                     for c in range(3)], axis=-1)


def measure_pixels(sets: dict[str, list[Path]]) -> list[dict[str, Any]]:
    """Per set and size: |dct - off| and each path's distance to the box reference."""
    from pipeline.images import load_image

    rows = []
    for name, paths in sets.items():
        for side in SIZES:
            size = (side, side)
            off = np.stack([load_image(p, size) for p in paths])
            dct = np.stack([load_image(p, size, jpeg_downscale="dct") for p in paths])
            ref = np.stack([_box_reference(p.read_bytes(), size) for p in paths])
            diff = dct - off
            rows.append({"set": name, "size": side, "n": len(paths),
                         "mean_abs": float(np.abs(diff).mean()),
                         "p99_abs": float(np.percentile(np.abs(diff), 99)),
                         "max_abs": float(np.abs(diff).max()),
                         "mean_signed_rgb": [round(float(v), 2)
                                             for v in diff.mean(axis=(0, 1, 2))],
                         "off_to_box": float(np.abs(off - ref).mean()),
                         "dct_to_box": float(np.abs(dct - ref).mean())})
    return rows


def measure_extract(sets: dict[str, list[Path]], folder: Path) -> list[dict[str, Any]]:
    """run_extract img/s of each mode in the input-bound case (module docstring)."""
    from benchmarks.common import fresh
    from pipeline.extract import ExtractConfig, run_extract

    rows = []
    for name in ("500x375", "2000x1500"):
        data = sets[name][0].parents[1]
        runs: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for r in range(5):  # round 0 warms the file cache and the model's trace
            for mode in MODES[::-1] if r % 2 else MODES:  # either first, in turn
                out = fresh(folder / f"extract-{mode}.h5")
                start = time.process_time()  # every thread of this process (decode auto
                # is threads on < 4 cores): robust to other tenants, unlike img/s
                result = run_extract(ExtractConfig(
                    str(data), "mobilenetv2", weights="none", input_size="96",
                    layer="block_3_expand", pooling="avg", out=str(out), jpeg_downscale=mode,
                    log_every=1e9))
                if r:
                    runs[mode].append(result.n_rows / result.seconds)
                    cpu[mode].append(1e3 * (time.process_time() - start) / result.n_rows)
        med = {mode: statistics.median(v) for mode, v in runs.items()}
        core = {mode: statistics.median(v) for mode, v in cpu.items()}
        rows.append({"set": name, "n": result.n_rows,
                     **{f"{m}_img_s": med[m] for m in MODES}, "dct/off": med["dct"] / med["off"],
                     **{f"{m}_runs": [round(v) for v in runs[m]] for m in MODES},
                     **{f"{m}_core_ms": core[m] for m in MODES},
                     # The model's build is in both (a constant): the difference is what
                     # dct saves per image.
                     "saved_core_ms": core["off"] - core["dct"]})
    return rows


def _photographs() -> list[np.ndarray]:
    """The photographs bundled offline: china, flower (scikit-learn), grace_hopper
    (matplotlib)."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as im:
        photos.append(np.asarray(im.convert("RGB")))
    return photos


def half_crops(folder: Path, per_class: int, *, scale: int = 1, seed: int = 0) -> list[Path]:
    """``folder/<photo>-<left|right>/img_#####.jpg``: random crops (40-70 % of a half's
    width, 4:3) of each photograph's halves, resized to 500x375 x ``scale``, flipped half
    the time, Gaussian noise (sigma 3), JPEG q90 (as make_images)."""
    from PIL import Image

    paths = []
    for p, photo in enumerate(_photographs()):
        for side, label in enumerate(("left", "right")):
            half = photo[:, side * photo.shape[1] // 2:(side + 1) * photo.shape[1] // 2]
            for i in range(per_class):
                path = folder / f"photo{p}-{label}" / f"img_{i:05d}.jpg"
                paths.append(path)
                if path.exists():
                    continue
                rng = np.random.default_rng([seed, p, side, i])
                w = int(half.shape[1] * rng.uniform(0.4, 0.7))
                h = min(half.shape[0], w * 3 // 4)
                top = int(rng.integers(0, half.shape[0] - h + 1))
                left = int(rng.integers(0, half.shape[1] - w + 1))
                size = (IMAGE_SIZE[1] * scale, IMAGE_SIZE[0] * scale)
                crop = Image.fromarray(half[top:top + h, left:left + w]).resize(
                    size, Image.Resampling.BICUBIC)
                pixels = np.asarray(crop, np.float32)
                if rng.random() < 0.5:
                    pixels = pixels[:, ::-1]
                pixels = np.clip(pixels + rng.normal(0, 3.0, pixels.shape), 0, 255)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return paths


def measure_accuracy(folder: Path, *, per_class: int, seed: int = 0) -> list[dict[str, Any]]:
    """Logistic-regression accuracy on each path's features, the same folds for both."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.bases import build_feature_model
    from pipeline.images import load_image

    setups = (("500x375", 1, 96, "block_3_expand"), ("500x375", 1, 96, None),
              ("2000x1500", 4, 224, None))
    rows = []
    for name, scale, side, layer in setups:
        paths = half_crops(folder / f"halves-x{scale}", per_class, scale=scale, seed=seed)
        labels = np.array([sorted({p.parent.name for p in paths}).index(p.parent.name)
                           for p in paths])
        model = build_feature_model("mobilenetv2", weights="none", input_size=(side, side),
                                    layer=layer, pooling="avg", seed=seed, batch_size=32)
        feats = {}
        for mode in MODES:
            images = np.stack([load_image(p, (side, side), jpeg_downscale=mode) for p in paths])
            feats[mode] = np.concatenate([model.features(images[s:s + 32])
                                          for s in range(0, len(images), 32)])
        folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(paths, labels))
        scores: dict[str, list[float]] = {"off": [], "dct": [], "off->dct": [], "dct->off": []}
        agree = 0
        for train, test in folds:
            heads = {}
            for mode in MODES:
                heads[mode] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                heads[mode].fit(feats[mode][train], labels[train])
                scores[mode].append(heads[mode].score(feats[mode][test], labels[test]))
            scores["off->dct"].append(heads["off"].score(feats["dct"][test], labels[test]))
            scores["dct->off"].append(heads["dct"].score(feats["off"][test], labels[test]))
            agree += int((heads["off"].predict(feats["off"][test])
                          == heads["dct"].predict(feats["dct"][test])).sum())
        rel = (np.linalg.norm(feats["dct"] - feats["off"], axis=1)
               / np.linalg.norm(feats["off"], axis=1))
        rows.append({"set": name, "size": side, "layer": layer or "top", "n": len(paths),
                     "classes": int(labels.max()) + 1,
                     "reduced": sorted({f"1/{v}" for v in _reductions(paths, (side, side))
                                        if v > 1}) or ["none"],
                     **{f"acc_{k}": (float(np.mean(v)), float(np.std(v)))
                        for k, v in scores.items()},
                     "same_prediction": agree / len(paths),
                     "feature_rel_diff_median": float(np.median(rel))})
    return rows


def format_rows(title: str, rows: list[dict[str, Any]]) -> str:
    """One table: a header of the keys, one line per row."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        if isinstance(v, tuple):
            return "±".join(f"{x:.3f}" for x in v)
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        return str(v)

    keys = list(rows[0])
    table = [keys, *[[cell(r[k]) for k in keys] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for and print one table each."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_downscale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="benchmark JPEGs (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--per-class", type=int, default=50, help="accuracy: images per class")
    p.add_argument("--data", default="data/bench-downscale", help="where images are written")
    p.add_argument("--parts", nargs="+",
                   choices=("speed", "rule", "pixels", "extract", "accuracy"),
                   default=["speed", "rule", "pixels", "extract", "accuracy"])
    args = p.parse_args(argv)
    folder = Path(args.data)
    print(f"jpeg_downscale: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    sets = (photo_sets(folder, args.images)
            if {"speed", "rule", "pixels", "extract"} & set(args.parts) else {})
    if "speed" in args.parts:
        print(format_rows("\nspeed: core-ms per image (read + sha256 + decode + resize), "
                          "off / dct", measure_speed(sets, repeats=args.repeats)), flush=True)
    if "rule" in args.parts:
        print(format_rows("\nrule: decode + resize core-ms; decoded >= input (K1, dct's "
                          "rule) or >= 2x input (K2); mean |x - off|, mean |x - box|",
                          measure_rule(sets, repeats=args.repeats)), flush=True)
    if "pixels" in args.parts:
        print(format_rows("\npixels: dct - off in levels (0..255); mean |x - box filter of "
                          "the accurate decode| for each", measure_pixels(sets)), flush=True)
    if {"extract", "accuracy"} & set(args.parts):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from pipeline.util.quiet import load_backend

        load_backend()
        # Keras' retracing warnings: every run builds a new model, on purpose.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if "extract" in args.parts:
        print(format_rows("\nextract: img/s, MobileNetV2 (random) cut at block_3_expand, "
                          "96 px, avg, batch 32, decode auto", measure_extract(sets, folder)),
              flush=True)
    if "accuracy" in args.parts:
        print(format_rows("\naccuracy: logistic regression, 5 folds (mean±std); a->b: "
                          "trained on a's features, scored on b's",
                          measure_accuracy(folder, per_class=args.per_class)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
