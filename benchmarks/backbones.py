"""A conv base and a small ViT pretrained the same way, probed the same way (docs/backbones.md).

    python -m benchmarks.backbones [--epochs 30] [--data /tmp/backbones]

Protocol, the demo's (pipeline/demo): both bases are trained from random weights on the
digits 0-4 (train split, same epochs, batch and seed), then frozen; the digits 5-9 are
extracted with each (``run_extract``, timed: img/s of the whole extraction) and a logistic
regression is fitted on each cache (``run_fit``: validation accuracy on the recorded split).
The same two architectures with random weights are a floor. The conv base is the demo's
convnet, cut where the demo cuts it; the ViT is a keras-hub ``ViTBackbone`` (32 px, 4x4
patches, 4 blocks of width 64) saved as a local preset with a converter of scale 1/255,
as the convnet sees x/255; its class token and patch-token mean are probed (``cls+mean``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32


def _vit(classes: int) -> tuple[Any, Any]:
    """(backbone, classifier on its class token): the ViT pretrained on digits 0-4."""
    import keras
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3), patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
        mlp_dim=128)
    pixels = keras.Input((SIZE, SIZE, 3))
    tokens = backbone(keras.layers.Rescaling(1 / 255)(pixels))
    logits = keras.layers.Dense(classes, activation="softmax")(tokens[:, 0])
    model = keras.Model(pixels, logits)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return backbone, model


def pretrain_vit(data_dir: Path, preset: Path, *, epochs: int, seed: int,
                 random: bool = False) -> float:
    """Train the ViT on ``data_dir``/train (or not, ``random``) and save it as a preset.

    Returns:
        Validation accuracy on ``data_dir``/validation (nan for the random one).
    """
    import keras
    import keras_hub

    from pipeline.demo.data import load_split

    x_train, y_train, classes = load_split(data_dir / "train", input_size=SIZE)
    x_val, y_val, _ = load_split(data_dir / "validation", input_size=SIZE)
    keras.utils.set_random_seed(seed)
    backbone, model = _vit(len(classes))
    accuracy = float("nan")
    if not random:
        # load_split gives x/255; the model rescales itself, so feed 0..255 as extract does.
        model.fit(x_train * 255, y_train, batch_size=32, epochs=epochs, verbose=0)
        accuracy = float(model.evaluate(x_val * 255, y_val, verbose=0)[1])
    backbone.save_to_preset(str(preset))
    keras_hub.layers.ImageConverter(image_size=(SIZE, SIZE), scale=1 / 255,
                                    offset=0.0).save_to_preset(str(preset))
    return accuracy


def _probe(task: Path, base: str, cache: Path, models: Path, **extract: Any) -> dict[str, Any]:
    """Extract ``task`` with ``base`` (timed) and fit a logreg probe: img/s and accuracy."""
    import json

    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.fit import FitConfig, run_fit

    for stale in (cache, cache.with_name(cache.name + ".partial")):
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    result = run_extract(ExtractConfig(str(task), base, out=str(cache), input_size=str(SIZE),
                                       **extract))
    seconds = time.perf_counter() - start
    model_dir, _ = run_fit(FitConfig(str(cache), head="logreg", out=str(models / cache.stem)))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return {"img_s": result.n_rows / seconds, "accuracy": float(metrics["accuracy"]),
            "features": int(np.prod(result.feature_shape))}


def main() -> None:
    """Run the comparison and print its table (Markdown)."""
    from pipeline.demo.data import write_digits
    from pipeline.demo.train import pretrain_base
    from pipeline.heads.convnet import CUT_LAYER

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="/tmp/backbones")
    args = parser.parse_args()
    root = Path(args.data)
    write_digits(root / "digits", seed=args.seed)
    pretrain, task = root / "digits" / "pretrain", root / "digits" / "task"
    rows = []
    conv = {"preprocess": "scale", "layer": CUT_LAYER, "pooling": "avg"}
    for weights in ("pretrained", "random"):
        conv_file = root / f"convnet-{weights}.keras"
        if weights == "pretrained":
            accuracy = pretrain_base(pretrain, conv_file, input_size=SIZE, epochs=args.epochs,
                                     seed=args.seed)
        else:
            import keras

            from pipeline.heads.convnet import build_convnet

            keras.utils.set_random_seed(args.seed)
            build_convnet(SIZE, 5, name="digits04_base").save(conv_file)
            accuracy = float("nan")
        rows.append(("convnet (demo base)", weights, accuracy,
                     _probe(task, str(conv_file), root / f"conv-{weights}.h5", root, **conv)))
        preset = root / f"vit-{weights}"
        accuracy = pretrain_vit(pretrain, preset, epochs=args.epochs, seed=args.seed,
                                random=weights == "random")
        rows.append(("ViT 4x64 (keras-hub)", weights, accuracy,
                     _probe(task, str(preset), root / f"vit-{weights}.h5", root,
                            pooling="cls+mean")))
    print("| base | weights | pretrain accuracy (digits 0-4) | features | probe accuracy "
          "(digits 5-9, logreg) | extract img/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, weights, accuracy, probe in rows:
        print(f"| {name} | {weights} | {accuracy:.3f} | {probe['features']} | "
              f"{probe['accuracy']:.3f} | {probe['img_s']:.0f} |")


if __name__ == "__main__":
    main()
