"""Inception-v3 as in the 2015-12-05 TensorFlow graph, the network every standard FID is computed with.

Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision". The 2015-12-05
graph (http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz) is what TF
FID (Heusel et al. 2017), ADM's evaluator, StyleGAN/EDM's detector and pytorch-fid use. It differs
from torchvision's ImageNet Inception-v3 in three ways, all reproduced here:
  - 1008 output classes (1000 ImageNet classes plus 8 unused ones);
  - the average-pool branch of every mixed block ignores padded zeros (TF's 'SAME' average pool);
  - the last block (Mixed_7c) uses a max pool, not an average pool, in its pool branch.

Module and parameter names follow pytorch-fid's port (`pt_inception-2015-12-05-*.pth`), so its
state dict loads as is: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch5x5_2.bn.running_var`, `fc.bias`.

    x (B, 3, 299, 299) in [-1, 1]
      stem: 3x3/2, 3x3, 3x3, maxpool/2, 1x1, 3x3, maxpool/2     -> (B, 192, 35, 35)
      Mixed_5b..5d  (Block35)                                   -> (B, 288, 35, 35)
      Mixed_6a      (Reduction35To17)                           -> (B, 768, 17, 17)
      Mixed_6b..6e  (Block17)                                   -> (B, 768, 17, 17)
      Mixed_7a      (Reduction17To8)                            -> (B, 1280, 8, 8)
      Mixed_7b..7c  (Block8)                                    -> (B, 2048, 8, 8)
      global average pool                                       -> (B, 2048)   "pool3" features (FID)
      fc                                                        -> (B, 1008)   logits (Inception Score)

The network takes images already scaled to [-1, 1]; `detectors.py` owns the input pipeline (uint8,
resize to 299, value range). Written in plain torch and TorchScript-friendly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048  # width of the pool3 features used by FID, KID and precision/recall
NUM_CLASSES = 1008  # width of the logits used by the Inception Score
INPUT_SIZE = 299  # the side the network was trained at; every reference pipeline resizes to it
BN_EPS = 1e-3  # TF's batch-norm epsilon in this graph


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU: the unit every layer of Inception-v3 is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TF's 'SAME' padding, averages only the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """35x35 mixed block (paper fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool3x3(x)),
        ], dim=1)  # (B, 224 + pool_channels, 35, 35)


class Reduction35To17(nn.Module):
    """Grid reduction 35 -> 17 (paper fig. 10): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)  # (B, 480 + in_channels, 17, 17)


class Block17(nn.Module):
    """17x17 mixed block with factorised 7x7 convolutions (paper fig. 6, n = 7)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(tf_avg_pool3x3(x)),
        ], dim=1)  # (B, 768, 17, 17)


class Reduction17To8(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(seven),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)  # (B, 512 + in_channels, 8, 8)


class Block8(nn.Module):
    """8x8 mixed block with expanded 1x3/3x1 outputs (paper fig. 7).

    max_pool: the 2015-12-05 graph pools with a max (not an average) in its last block, Mixed_7c.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_avg_pool3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)  # (B, 2048, 8, 8)


class InceptionV3(nn.Module):
    """The 2015-12-05 Inception-v3 graph: forward(x in [-1, 1]) -> (pool3 features, logits)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_channels=32)
        self.Mixed_5c = Block35(256, pool_channels=64)
        self.Mixed_5d = Block35(288, pool_channels=64)
        self.Mixed_6a = Reduction35To17(288)
        self.Mixed_6b = Block17(768, channels_7x7=128)
        self.Mixed_6c = Block17(768, channels_7x7=160)
        self.Mixed_6d = Block17(768, channels_7x7=160)
        self.Mixed_6e = Block17(768, channels_7x7=192)
        self.Mixed_7a = Reduction17To8(768)
        self.Mixed_7b = Block8(1280, max_pool=False)
        self.Mixed_7c = Block8(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2048) average-pooled features of the last mixed block."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                               # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                          # (B, 2048)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pool3(x)
        return features, self.fc(features)  # (B, 2048), (B, 1008)


def build_inception(seed: int | None = None) -> InceptionV3:
    """An Inception-v3 in eval mode, randomly initialised (from `seed` when given) until weights are loaded.

    The random weights are He-initialised (Kaiming normal, fan-in, ReLU gain) so activations keep
    their scale through the 94 conv layers; with PyTorch's default init they shrink to ~0 and every
    image would get the same features. A random network's numbers mean nothing, but they do tell
    images apart, which is what tests and benchmarks of the pipeline need.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = InceptionV3()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(net.fc.weight, std=FEATURE_DIM ** -0.5)
        nn.init.zeros_(net.fc.bias)
    return net.eval()
