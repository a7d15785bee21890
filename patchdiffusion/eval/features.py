"""Batched Inception feature extraction, on CUDA when there is one.

Features are computed in float32 on the device and kept on the host as float32 (N, 2048); the
statistics built from them (`frechet.feature_statistics`) are float64, as in EDM and pytorch-fid.
TF32 is switched off while extracting on CUDA, so GPU features agree with float32 CPU features to
round-off instead of to TF32's ~3 significant digits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .detectors import InceptionDetector


@dataclass
class InceptionFeatures:
    features: np.ndarray  # (N, 2048) float32 pool3 features
    class_probs: np.ndarray | None  # (N, 1008) float32 class probabilities, when collected

    def __len__(self) -> int:
        return len(self.features)


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off on CUDA for the duration, restoring the caller's settings afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FeatureCollector:
    """Runs each uint8 batch through the detector and keeps the outputs (one `add` per batch)."""

    def __init__(self, detector: InceptionDetector, device: torch.device, with_class_probs: bool = False):
        self.detector = detector.to(device)
        self.device = device
        self.with_class_probs = with_class_probs
        self._features: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []

    def add(self, images: torch.Tensor) -> None:
        with full_float32(self.device):
            outputs = self.detector(images.to(self.device, non_blocking=True), self.with_class_probs)
        self._features.append(outputs.features.cpu().numpy().astype(np.float32))
        if self.with_class_probs:
            self._probs.append(outputs.class_probs.cpu().numpy().astype(np.float32))

    def result(self) -> InceptionFeatures:
        features = np.concatenate(self._features) if self._features else np.zeros((0, 2048), np.float32)
        probs = np.concatenate(self._probs) if self.with_class_probs and self._probs else None
        return InceptionFeatures(features, probs)


def extract_features(
    batches, detector: InceptionDetector, device: torch.device, with_class_probs: bool = False,
    progress: bool = False, total: int | None = None, description: str = "inception",
) -> InceptionFeatures:
    """Features of every image in `batches` (an iterable of uint8 (B, 3, H, W) tensors)."""
    collector = FeatureCollector(detector, device, with_class_probs)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit="img")
    for images in batches:
        collector.add(images)
        if progress:
            bar.update(len(images))
    if progress:
        bar.close()
    return collector.result()
