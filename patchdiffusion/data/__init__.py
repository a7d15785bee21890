"""Data layer: image sources (folder, zip, LMDB, built-in), conversion, and the torch dataset.

    source = open_source("builtin:textures?count=200", resolution=64)
    summary = convert_dataset("photos/", "photos-64.zip", resolution=(64, 64))
    dataset = ImageDataset(open_source("photos-64.zip"), resolution=(64, 64))

Modules, one job each:
    errors.py      DataError (bad path/spec/data set) and UnreadableImageError (one bad file)
    transforms.py  any picture -> uint8 RGB; center-crop / resize to (width, height)
    formats.py     the zip (EDM) and LMDB (Patch-DM) layouts, shared by readers and writers
    base.py        the ImageSource interface and image decoding
    sources.py     FolderSource, ZipSource, LmdbSource, and open_source(spec)
    builtin.py     BuiltinSource: offline sets from scikit-image / scikit-learn pictures
    writers.py     streaming zip / LMDB / folder writers and staged (temp + rename) output
    convert.py     convert_dataset and its ConvertSummary
    training_set.py  open_training_set: the training loop's dataset, bad images skipped and listed
    dataset.py     ImageDataset (torch) and hflip
Sizes are (width, height) throughout this package, as in PIL; arrays are (H, W, 3) uint8.
"""

from .base import DecodedImage, ImageSource, decode_image
from .builtin import BUILTIN_SETS, TEXTURE_FAMILIES, BuiltinSource
from .convert import ConvertSummary, convert_dataset
from .dataset import ImageDataset, hflip
from .errors import DataError, UnreadableImageError
from .sources import FolderSource, LmdbSource, ZipSource, open_source
from .training_set import SubsetSource, TrainingSetReport, open_training_set
from .transforms import TRANSFORMS, apply_transform, center_crop_resize, width_height, resize, to_rgb_uint8

__all__ = [
    "BUILTIN_SETS",
    "TEXTURE_FAMILIES",
    "TRANSFORMS",
    "BuiltinSource",
    "ConvertSummary",
    "DataError",
    "DecodedImage",
    "FolderSource",
    "ImageDataset",
    "ImageSource",
    "LmdbSource",
    "SubsetSource",
    "TrainingSetReport",
    "UnreadableImageError",
    "ZipSource",
    "apply_transform",
    "center_crop_resize",
    "convert_dataset",
    "decode_image",
    "hflip",
    "open_source",
    "open_training_set",
    "width_height",
    "resize",
    "to_rgb_uint8",
]
