"""The networks: training-split normalization as constants, then Linear/Conv -> BatchNorm -> ReLU blocks.

Each network takes raw inputs (float features, or uint8 images) and normalizes them itself, so
the exported graph carries the statistics and nothing else has to apply them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit_normalizer(X_train: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale from the training rows only (scikit-learn's StandardScaler).

    Disabled (for ablation) it is the identity: mean 0, scale 1, so the graph keeps one shape.
    """
    if not enabled:
        return np.zeros(X_train.shape[1]), np.ones(X_train.shape[1])
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(X_train)  # ddof=0; a zero-variance feature gets scale 1
    return scaler.mean_, scaler.scale_


def fit_channel_stats(images: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (population, ddof=0) of uint8 [N, C, H, W] training
    images on the 0..1 scale; a constant channel gets std 1. Disabled: mean 0, std 1."""
    channels = images.shape[1]
    if not enabled:
        return np.zeros(channels), np.ones(channels)
    x = images.astype(np.float64) / 255.0
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    return mean, np.where(std > 0, std, 1.0)


def image_transform(mean, std):
    """uint8 images -> float 0..1 -> per-channel normalization, as a torchvision v2 pipeline: the
    module used in training is the one exported into the graph (Cast, Mul, Sub, Div)."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([float(m) for m in mean], [float(s) for s in std])])


def augmentation():
    """Light, label-preserving changes applied to training batches only (uint8 in, uint8 out)."""
    from torchvision.transforms import v2
    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1))


class Standardize(nn.Module):
    """(x - mean) / scale with fixed statistics: buffers, so they export as graph constants."""

    def __init__(self, mean, scale):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class TabularNet(nn.Module):
    """Standardize -> [Linear -> BatchNorm1d -> ReLU -> Dropout] x len(hidden) -> Linear.

    Returns logits for classification, or the standardized target for regression.
    """

    def __init__(self, n_features: int, n_outputs: int, hidden: list[int], batchnorm: bool = True,
                 dropout: float = 0.0, mean=None, scale=None):
        super().__init__()
        self.normalize = Standardize(np.zeros(n_features) if mean is None else mean,
                                     np.ones(n_features) if scale is None else scale)
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            # A bias before BatchNorm is cancelled by its mean subtraction.
            layers += [nn.Linear(width, h, bias=not batchnorm)]
            layers += [nn.BatchNorm1d(h)] if batchnorm else []
            layers += [nn.ReLU(inplace=True)]  # neither BatchNorm nor Linear needs its output back
            layers += [nn.Dropout(dropout)] if dropout else []
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


class ConvNet(nn.Module):
    """torchvision normalization -> [Conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2] x len(channels)
    -> global average pool -> Dropout -> Linear. Takes uint8 [N, C, H, W]; returns logits."""

    def __init__(self, in_channels: int, n_outputs: int, channels: list[int], batchnorm: bool = True,
                 dropout: float = 0.0, mean=None, std=None, augment: bool = False):
        super().__init__()
        self.normalize = image_transform(np.zeros(in_channels) if mean is None else mean,
                                         np.ones(in_channels) if std is None else std)
        self.augment = augmentation() if augment else None
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(c)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            width = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers += [nn.Dropout(dropout)] if dropout else []
        layers.append(nn.Linear(width, n_outputs))
        self.body = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and self.augment is not None:
            images = self.augment(images)
        return self.body(self.normalize(images))


class Classifier(nn.Module):
    """Export head: raw features -> (class probabilities, class index)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor):
        probabilities = torch.softmax(self.net(inputs), dim=-1)
        return probabilities, probabilities.argmax(dim=-1)


class Regressor(nn.Module):
    """Export head: raw features -> prediction in the target's original units."""

    def __init__(self, net: nn.Module, y_mean: float, y_scale: float):
        super().__init__()
        self.net = net
        self.register_buffer("y_mean", torch.tensor(float(y_mean)))
        self.register_buffer("y_scale", torch.tensor(float(y_scale)))

    def forward(self, features: torch.Tensor):
        return self.net(features).squeeze(-1) * self.y_scale + self.y_mean


def serving_model(net: nn.Module, task: str, y_mean: float = 0.0, y_scale: float = 1.0) -> nn.Module:
    """The module that is exported: the trained net plus its output head, in eval mode."""
    head = Classifier(net) if task == "classification" else Regressor(net, y_mean, y_scale)
    return head.eval()
