"""The original project's handcrafted CNN (``baseline_cnn``) and a dense network (``mlp``)."""

from __future__ import annotations

from torch import nn

from cifar_hpo.params import TrialParams


def baseline_cnn(params: TrialParams, num_classes: int) -> nn.Module:
    """The original project's handcrafted CNN, exactly (logits out, no softmax)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(params: TrialParams, num_classes: int) -> nn.Module:
    """A dense network on flattened pixels.

    arch: ``hidden`` units per layer (default 512), ``depth`` hidden layers
    (default 2), ``image_size`` (default 32). Dropout ``params.dropout`` after
    each hidden layer.
    """
    hidden = int(params.arch.get("hidden", 512))
    depth = int(params.arch.get("depth", 2))
    size = int(params.arch.get("image_size", 32))
    layers: list[nn.Module] = [nn.Flatten()]
    width = 3 * size * size
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(params.dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
