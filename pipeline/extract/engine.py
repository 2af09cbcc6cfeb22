"""What both engines (local, Ray) share: the model they build, how rows are stored,
how an interrupted run stops."""

from __future__ import annotations

import numpy as np

from pipeline.bases import FeatureModel, build_feature_model
from pipeline.extract.config import ExtractConfig, policy
from pipeline.interrupts import Interrupted

__all__ = ["FLOAT16_MAX", "ExtractInterrupted", "build_model", "stopped", "stored_features"]


FLOAT16_MAX = float(np.finfo(np.float16).max)


class ExtractInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: what was committed is safe and the run can be resumed.

    The message says what was kept and how to go on; ``exit_code`` is 130 or 143.
    """


def stopped(exc: KeyboardInterrupt, kept: str) -> ExtractInterrupted:
    """The :class:`ExtractInterrupted` for ``exc``: ``extract: interrupted by <signal>; <kept>``."""
    kind = exc if isinstance(exc, Interrupted) else Interrupted()
    return ExtractInterrupted(f"extract: interrupted by {kind.signal_name}; {kept}",
                              kind.exit_code)


def build_model(config: ExtractConfig, size: tuple[int, int] | None) -> FeatureModel:
    """The frozen feature model ``config`` asks for (``size``: the parsed input size).

    Every engine builds its base here (each Ray actor too), so all run the same model.
    """
    return build_feature_model(
        config.base,
        weights=config.weights,
        input_size=size,
        layer=config.layer,
        pooling=config.pooling,
        preprocess_mode=config.preprocess,
        seed=config.seed,
        precision=policy(config),
        jit=config.jit,
        batch_size=config.batch_size,
        fold_batchnorm=config.fold_batchnorm == "on",
    )


def stored_features(features: np.ndarray, dtype: str) -> np.ndarray:
    """Features cast to the cache dtype; refuses values float16 would turn into inf."""
    if dtype == "float16":
        peak = float(np.max(np.abs(features))) if features.size else 0.0
        if np.isfinite(peak) and peak > FLOAT16_MAX:
            raise ValueError(
                f"Features reach {peak:.4g}, beyond the float16 range (±{FLOAT16_MAX:.0f}); "
                "they would be stored as inf. Use --dtype float32 (delete the partial cache "
                "first). Received: dtype='float16'"
            )
        return features.astype(np.float16)
    return features.astype(np.float32, copy=False)
