"""Fine-tune the top of the base end to end on the images, warm-started from a dense head.

Chollet's step 3 (2016) and the Keras transfer-learning guide: once a head has learnt on
the frozen base's features, unfreeze the top of the base and train base top + head
together on the (augmented) images with a small learning rate (SGD 1e-4, momentum 0.9).
The head must be trained first: a random head would send large gradients into the
pretrained layers and wreck them.

    head dir or cache -> rebuild base (cache_attrs) + head -> augment -> preprocess ->
    base (inference mode, top blocks trainable) -> head -> end-to-end ``model.keras``

The modules, in the order a run uses them:

- ``config``: ``FinetuneConfig`` (what was asked, checked before any file is read);
- ``source``: the head folder or cache it starts from, and the cache the head was trained on;
- ``data``: the split's image files, checked on disk, and ``tf.data`` pipelines of them;
- ``model``: which layers train (:func:`unfreeze_start`, :func:`set_trainable`, blocks by
  layer name) and the compiled training model that keeps the base in inference mode;
- ``run``: ``run_finetune``, the protocol.
"""

from __future__ import annotations

from pipeline.util.lazy import lazy_exports

# Where each public name lives, loaded on first use (pipeline/util/lazy.py): the arguments
# are checked before Keras loads.
_HOMES = {
    "FinetuneConfig": "pipeline.finetune.config",
    "block_of": "pipeline.bases.blocks",
    "blocks_of": "pipeline.bases.blocks",
    "check_config": "pipeline.finetune.config",
    "image_dataset": "pipeline.finetune.data",
    "run_finetune": "pipeline.finetune.run",
    "set_trainable": "pipeline.finetune.model",
    "unfreeze_start": "pipeline.finetune.model",
}

__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
