"""Bottleneck-feature pipeline: frozen Keras base -> HDF5 feature cache -> fast heads.

Modules in data-flow order: images (find + decode), bases (frozen feature model),
cache/ (HDF5 store), extract/ (images -> cache), heads/ + fit + compare (cache ->
classifier), finetune and predict (images -> classes); util/ (files), progress (bars and
log lines), interrupts (Ctrl-C that always stops in order), cli (argparse for every
command), demo. README: "How the code is laid out".
"""

import os

# Quiets TensorFlow's C++ INFO/WARNING logs from kernels (retracing, oneDNN notes) in the
# progress output of batch jobs; the few lines TF 2.21 prints while loading, before its
# logger reads this setting, still appear. Users can override it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
