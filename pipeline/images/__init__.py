"""Images: find them in a folder (``index``) or read them from a manifest or path list
(``manifest``), decode one as Keras does (``decode``), decode many ahead in ordered batches
(``batches``). Every public name is re-exported here."""

from pipeline.images.batches import DECODERS, DecodedBatch, check_decode, decoded_batches
from pipeline.images.decode import (
    INTERPOLATIONS,
    MAX_PIXELS,
    ImageReadError,
    check_interpolation,
    decode_bytes,
    decode_image,
    has_tensorflow,
    load_image,
    parse_size,
    read_image,
    read_images_into,
    resize,
    resize_bilinear,
)
from pipeline.images.index import (
    IMAGE_EXTENSIONS,
    SPLIT_FOLDERS,
    SPLIT_ORDER,
    ImageIndex,
    ImageRecord,
    image_files,
    index_images,
)
from pipeline.images.manifest import (
    LIST_EXTENSIONS,
    MANIFEST_COLUMNS,
    ListedPath,
    index_data,
    index_manifest,
    is_list_file,
    is_manifest,
    read_path_list,
)

__all__ = [
    "DECODERS",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "LIST_EXTENSIONS",
    "MANIFEST_COLUMNS",
    "MAX_PIXELS",
    "SPLIT_FOLDERS",
    "SPLIT_ORDER",
    "DecodedBatch",
    "ImageIndex",
    "ImageReadError",
    "ImageRecord",
    "ListedPath",
    "check_decode",
    "check_interpolation",
    "decode_bytes",
    "decode_image",
    "decoded_batches",
    "has_tensorflow",
    "image_files",
    "index_data",
    "index_images",
    "index_manifest",
    "is_list_file",
    "is_manifest",
    "load_image",
    "parse_size",
    "read_image",
    "read_images_into",
    "read_path_list",
    "resize",
    "resize_bilinear",
]
