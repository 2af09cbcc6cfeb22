"""Bottleneck-feature pipeline: frozen Keras base -> HDF5 feature cache -> fast heads.

Modules in data-flow order: images (find + decode), bases (frozen feature model),
cache (HDF5 store), extract (images -> cache), heads + fit (cache -> classifier),
progress (bars and log lines), cli (argparse for every command), demo.
"""

import os

# TensorFlow's C++ INFO/WARNING chatter buries the progress lines of batch jobs;
# errors still show. Users can override by setting the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
