"""Reference statistics files (`patchdiff eval ref`): EDM's fid-refs layout, plus what other metrics need.

An .npz with
    mu          (2048,) float64     mean of the pool3 features          } exactly what EDM's fid.py
    sigma       (2048, 2048) float64 unbiased covariance                } writes and reads
    features    (N, 2048) float32   the features themselves (optional: KID and precision/recall
                                    need them; 8 KiB per image)
    pipeline    str                 the Inception input pipeline they were made with
    detector    str                 the weights file's format
    source      str                 the data set they describe
    num_images  int
    image_size  (2,) int            (width, height) the images were read at
EDM's own files hold only mu and sigma; they load here too (FID only, pipeline unrecorded).
Strings are stored as numpy unicode arrays, so files load with allow_pickle=False.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EvalError
from .frechet import GaussianStatistics, feature_statistics


@dataclass
class ReferenceFile:
    path: Path
    statistics: GaussianStatistics
    features: np.ndarray | None  # (N, 2048) float32, when stored
    pipeline: str | None  # None for files that do not record it (EDM's fid-refs)
    detector: str | None
    source: str | None
    image_size: tuple[int, int] | None  # (W, H) of the images, when recorded


def save_reference(
    path: str | os.PathLike,
    features: np.ndarray,
    pipeline: str,
    detector: str,
    source: str,
    image_size: tuple[int, int],
    keep_features: bool = True,
) -> Path:
    """Write mu, sigma (and the features) of a data set; the file appears only when complete."""
    path = Path(path)
    if path.suffix != ".npz":
        raise EvalError(f"reference statistics are written as .npz; got '{path}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    statistics = feature_statistics(features)
    arrays = dict(
        mu=statistics.mu, sigma=statistics.sigma, pipeline=np.array(pipeline), detector=np.array(detector),
        source=np.array(source), num_images=np.array(len(features)), image_size=np.array(image_size),
    )
    if keep_features:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    # Written under a temporary name in the same folder, then renamed: a crash never leaves half a file.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_reference(path: str | os.PathLike) -> ReferenceFile:
    """Read a reference .npz (ours or EDM's)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics '{path}' do not exist (make them with `patchdiff eval ref`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as error:
        raise EvalError(f"cannot read '{path}' as an .npz file: {type(error).__name__}: {error}") from None
    if "mu" not in contents or "sigma" not in contents:
        raise EvalError(f"'{path}' has no 'mu' and 'sigma' arrays (keys: {', '.join(contents) or 'none'})")
    mu, sigma = contents["mu"].astype(np.float64), contents["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvalError(f"'{path}': mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")

    def text(key: str) -> str | None:
        return str(contents[key]) if key in contents else None

    count = int(contents["num_images"]) if "num_images" in contents else 0
    image_size = tuple(int(v) for v in contents["image_size"]) if "image_size" in contents else None
    return ReferenceFile(
        path=path,
        statistics=GaussianStatistics(mu, sigma, count),
        features=contents.get("features"),
        pipeline=text("pipeline"),
        detector=text("detector"),
        source=text("source"),
        image_size=image_size,
    )
