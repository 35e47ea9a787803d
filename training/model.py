"""The networks: the fitted normalizer's module (training/normalize.py), then Linear/Conv ->
BatchNorm -> ReLU blocks, and the heads that are exported.

Each network takes raw inputs (float features, or uint8 images) and normalizes them itself, so
the exported graph carries the statistics and nothing else has to apply them.
"""
from __future__ import annotations

import torch
from torch import nn


def augmentation():
    """Light, label-preserving changes applied to training batches only (uint8 in, uint8 out)."""
    from torchvision.transforms import v2
    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1))


class TabularNet(nn.Module):
    """normalize -> [Linear -> BatchNorm1d -> ReLU -> Dropout] x len(hidden) -> Linear, plus,
    with `linear_skip`, a Linear layer straight from the normalized inputs to the outputs (a
    linear model beside the network, for tables where one does well).

    Returns logits for classification, or the standardized target for regression.
    """

    def __init__(self, n_features: int, n_outputs: int, hidden: list[int], batchnorm: bool = True,
                 dropout: float = 0.0, normalize: nn.Module | None = None, linear_skip: bool = False,
                 embed: nn.Module | None = None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.embed = embed  # --embedding: fixed (buffers), the first layer on the normalized inputs
        with torch.no_grad():  # the width the first Linear layer takes (an embedding widens it)
            width = self.inputs(self.normalize(torch.zeros(1, n_features))).shape[1]
        self.skip = nn.Linear(width, n_outputs, bias=False) if linear_skip else None
        layers: list[nn.Module] = []
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
        return self.from_normalized(self.normalize(x))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized inputs as the first Linear layer takes them."""
        return x if self.embed is None else self.embed(x)

    def from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_inputs(self.inputs(x))

    def from_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """From the inputs as the first Linear layer takes them (normalized, embedded)."""
        return self.body(x) if self.skip is None else self.body(x) + self.skip(x)


class ConvNet(nn.Module):
    """pixels to 0..1 -> normalize -> [Conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2] x len(channels)
    -> global average pool -> Dropout -> Linear. Takes uint8 [N, C, H, W]; returns logits."""

    def __init__(self, in_channels: int, n_outputs: int, channels: list[int], batchnorm: bool = True,
                 dropout: float = 0.0, normalize: nn.Module | None = None, augment: bool = False):
        super().__init__()
        from torchvision.transforms import v2
        # A torchvision pipeline: the module used in training is the one exported (Cast, Mul, Sub, Div).
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), normalize or nn.Identity()])
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
        return self.from_normalized(self.normalize(images))

    def from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


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


def build_network(cfg, modality: str, n_inputs: int, n_outputs: int, normalize: nn.Module,
                  embed: nn.Module | None = None) -> nn.Module:
    """The network a config describes, for inputs of this width (or channels, for images)."""
    if modality == "image":
        return ConvNet(n_inputs, n_outputs, cfg.channels, cfg.batchnorm, cfg.dropout, normalize,
                       cfg.augment)
    return TabularNet(n_inputs, n_outputs, cfg.hidden, cfg.batchnorm, cfg.dropout, normalize,
                      cfg.linear_skip, embed if cfg.embedding != "none" else None)


def serving_model(net: nn.Module, task: str, y_mean: float = 0.0, y_scale: float = 1.0) -> nn.Module:
    """The module that is exported: the trained net plus its output head, in eval mode."""
    head = Classifier(net) if task == "classification" else Regressor(net, y_mean, y_scale)
    return head.eval()
