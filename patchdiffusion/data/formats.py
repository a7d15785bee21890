"""On-disk layouts, written down once so that readers (`sources.py`) and writers (`writers.py`) agree.

Zip (EDM's dataset_tool layout)::

    00000/img00000000.png  00000/img00000001.png ... 00001/img00001000.png ...
    dataset.json   {"labels": [["00000/img00000000.png", 3], ...] or null,
                    "original_names": [["00000/img00000000.png", "cats/tabby.jpg"], ...]}

  EDM reads only "labels"; "original_names" is ours, so that names survive a round trip.

LMDB (Patch-DM's / DiffAE's img2lmdb layout)::

    b"0000042" -> encoded image bytes (we write PNG; JPEG, WebP, ... are read too)
    b"length"  -> number of images as ASCII digits
    b"names"   -> optional JSON list of original names, one per index
    b"labels"  -> optional JSON list of integer labels, one per index
"""

from __future__ import annotations

# File name suffixes (lower case) that folder and zip sources treat as images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

ZIP_METADATA_NAME = "dataset.json"
LMDB_LENGTH_KEY = b"length"
LMDB_NAMES_KEY = b"names"
LMDB_LABELS_KEY = b"labels"
LMDB_DATA_FILE = "data.mdb"


def edm_zip_name(index: int) -> str:
    """Archive name of image `index` in EDM's layout: 1000 images per folder."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def lmdb_key(index: int) -> bytes:
    """LMDB key of image `index`: its zero-padded 7-digit decimal index."""
    return f"{index:07d}".encode("ascii")


def has_image_extension(name: str) -> bool:
    """True when a file name ends in one of IMAGE_EXTENSIONS (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS
