"""Datasets: the embedded digits default, a synthetic set for tests, ImageNet-style folders, Parquet.

Every loader returns `Splits`: a train split (what supertraining trains on), a search split (held out, only
used to rank subnets) and a test split. Every item is ``(image, label)``: a float32 tensor of shape
``(in_chans, img_size, img_size)`` and an int. Datasets are plain picklable objects with a ``targets`` list.

Two kinds of dataset:

- In memory (`TensorData`): digits and synthetic. Small; they keep their fast path (a DataLoader over tensors).
- File-backed (`ImageFiles`, `ParquetRows`, both `FileImages`): ImageFolder trees and Parquet shards, on a
  local disk or in a bucket (``s3://``, ``gs://``, ``file://``, read through ``pyarrow.fs``). They hold an
  index, never the encoded bytes: ImageFolder items are paths; Parquet items are (file, row) references, and
  only the label column is read up front. Reading one image reads its file, or its Parquet row group. Each is
  a map-style torch ``Dataset`` (a plain DataLoader can iterate it) and exposes its items (``sources``,
  ``targets``) so `pipeline.common.data` can stream it through Ray Data.

One module per concern, as in ``timm/data``: `splits` (`Splits`, `DataError`, held-out and balanced subsets),
`memory` (digits, synthetic), `storage` (local disks and buckets), `decode`, `transforms`, `files`
(`FileImages`, `ImageFiles`), `folder` (ImageFolder trees), `parquet` (shards and their rows), `load`
(`load_data`, `verify`).

Every decoding path goes through `decode_image` (the formats real folders hold: RGB/greyscale/CMYK JPEG, RGBA
and 16-bit PNG, palette GIF, WebP, EXIF-rotated files, images smaller than the crop) and every transform
comes from `build_transform` (timm's ``create_transform``: DeiT's recipe when asked, light by default).
"""

from .decode import decode_image
from .files import FileImages, ImageFiles
from .folder import image_folder
from .load import load_data, verify
from .memory import TensorData, digits, synthetic
from .parquet import ParquetRows, parquet
from .splits import DataError, Splits, balanced_subset
from .storage import Storage, redact
from .transforms import DEIT_AUGMENT, Augment, build_transform, load_image

__all__ = [
    "DataError",
    "Splits",
    "TensorData",
    "Storage",
    "FileImages",
    "ImageFiles",
    "ParquetRows",
    "Augment",
    "DEIT_AUGMENT",
    "decode_image",
    "build_transform",
    "load_image",
    "balanced_subset",
    "digits",
    "synthetic",
    "image_folder",
    "parquet",
    "load_data",
    "verify",
    "redact",
]
