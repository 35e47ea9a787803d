"""The network: training-split normalization as constants, then Linear -> BatchNorm1d -> ReLU blocks."""
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
            layers += [nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout else []
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


class Classifier(nn.Module):
    """Export head: raw features -> (class probabilities, class index)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor):
        probabilities = torch.softmax(self.net(features), dim=-1)
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
