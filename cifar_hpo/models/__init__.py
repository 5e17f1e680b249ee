"""Model registry: one `Model` entry per name in ``MODELS``.

    from cifar_hpo import models
    net = models.build(models.default_params("fast_cnn", "cpu"), num_classes=10)

Every model takes normalized float images (B, 3, 32, 32) and returns logits
(B, num_classes); the loss is cross-entropy on logits, so no model ends in a
softmax. Adding an architecture is one builder and one `Model` entry in
``MODELS``: its builder, the arch options it reads, its fine-tune stages (if it
has pretrained weights) and its default recipe per device kind (cpu, gpu).

Models:
    baseline_cnn  the original project's LeNet-style CNN, layer for layer.
    mlp           a dense network; arch: ``hidden`` (width), ``depth`` (hidden layers).
    resnet18      torchvision ResNet-18; arch: ``cifar_stem``, ``upsample``, ``head_hidden``.
    densenet121   torchvision DenseNet-121; same arch options as resnet18.
    fast_cnn      our network built for time-to-accuracy; arch: ``width`` (multiplier of
                  64/256/256 channels) or ``widths``, ``stem_stride`` (1 or 2), ``act``
                  (gelu|relu), ``tta`` (0 none, 1 mirror, 2 mirror + translate), ``logit_scale``,
                  ``bn_momentum``, ``identity_init``.

Modules: `registry` (``MODELS``, `build`, `default_params`, what training asks of each
model), one module per family (`simple`, `fast`, `pretrained`), and `final` (the
``final.pt`` format: a trained model with its classes and normalization; not
re-exported, import ``cifar_hpo.models.final``).
"""

from cifar_hpo.models.fast import FastCNN
from cifar_hpo.models.pretrained import PretrainedNet, weights_path
from cifar_hpo.models.registry import (
    DEVICE_KINDS,
    MODELS,
    Model,
    apply_changes,
    build,
    checked_changes,
    count_params,
    default_params,
    device_kind,
    get,
    params_for,
)

__all__ = [
    "MODELS", "Model", "DEVICE_KINDS", "get", "build", "default_params", "device_kind", "count_params", "weights_path",
    "params_for", "checked_changes", "apply_changes", "FastCNN", "PretrainedNet",
]  # fmt: skip
