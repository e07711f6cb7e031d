"""A small CNN classifier for Fashion-MNIST at 32x32. Its penultimate features give a fast FID space."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.io import Pretrained


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    num_features: int = 128
    image_size: int = 32


class Classifier(Pretrained, nn.Module):
    config_class = ClassifierConfig
    kind = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(config.in_channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.fc = nn.Linear(4 * w * (config.image_size // 8) ** 2, config.num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.num_features, config.num_classes)

    @property
    def num_features(self) -> int:  # torchmetrics' FID asks feature extractors for this
        return self.config.num_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 1, 32, 32] in [-1, 1] -> penultimate features [B, num_features]."""
        return F.relu(self.fc(self.body(images).flatten(1)))

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, C, H, W] in [-1, 1] -> the activations after each of the three conv blocks (at H/2, H/4 and
        H/8), the layers a perceptual distance compares."""
        maps, h = [], images
        for block in self.body:
            h = block(h)
            maps.append(h)
        return maps

    def perceptual_distance(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """LPIPS-style distance [B] between two image batches in this network's feature space: at each block's
        output, every spatial position's channel vector is scaled to unit length, the squared difference is summed
        over channels and averaged over positions; the blocks' terms are added with equal weights (LPIPS learns
        per-channel weights on human judgements; none exist for these images). Zero iff the normalised features
        agree; differentiable in ``images`` (run the network in eval mode so BatchNorm uses its running
        statistics)."""
        total = images.new_zeros(images.shape[0])
        for a, b in zip(self.feature_maps(images), self.feature_maps(reference)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean((1, 2))
        return total

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return torch.cat([self(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])
