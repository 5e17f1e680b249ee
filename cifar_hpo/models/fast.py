"""``fast_cnn``: airbench94's network (whitening stem, three conv groups, scaled logits, test-time augmentation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams


class _ConvGroup(nn.Sequential):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act (halves H and W)."""

    def __init__(
        self, c_in: int, c_out: int, act: Callable[[], nn.Module], bn_momentum: float, identity_init: bool
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            _bn(c_out, bn_momentum),
            act(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _bn(c_out, bn_momentum),
            act(),
        )
        if identity_init:
            # The first c_in filters of each conv start as the identity (pass their input
            # channel through), the rest keep torch's default init (airbench's init).
            with torch.no_grad():
                for conv in (self[0], self[4]):
                    assert isinstance(conv, nn.Conv2d)
                    w = conv.weight
                    nn.init.dirac_(w[: min(w.shape[0], w.shape[1])])


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    # Scale fixed at 1 (only the shift learns): with the scaled logits below this
    # trains faster at high learning rates and removes a redundant degree of freedom.
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-5)
    bn.weight.requires_grad_(False)
    return bn


class FastCNN(nn.Module):
    """Small VGG-like network tuned for speed to accuracy on CIFAR-10.

    Ideas from the published fast CIFAR-10 recipes (arXiv 2404.00498):
    a frozen 2x2 patch-whitening first layer initialised from the data
    (`init_from_data`, called by `train.train` before the first step), three
    conv groups with max-pooling, BatchNorm without a learnt scale, a global
    max-pool, a bias-free linear layer whose logits are scaled down, and
    test-time augmentation in eval mode (mirror, and 1-pixel translations). Training-side tricks
    (label smoothing, Nesterov SGD, one-cycle lr) live in the recipe
    (``MODELS["fast_cnn"].recipes``).

    Args:
        num_classes: output logits.
        widths: channels of the three conv groups (full size: 64, 256, 256).
        act: "gelu" or "relu".
        tta: test-time augmentation in eval mode: 0 none; 1 average the logits of the
            image and its mirror image; 2 also of both shifted one pixel up-left and
            down-right (reflected border), weighted half and half (6 passes, airbench's level 2).
        logit_scale: multiplies the logits (1/9 keeps early softmax outputs soft).
        bn_momentum: BatchNorm running-statistics momentum (torch convention).
        stem_stride: 1 (2x2 patches overlap, 31x31 out) or 2 (non-overlapping, 16x16 out).
        identity_init: start each conv's first filters as the identity (`_ConvGroup`).
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        act: str = "gelu",
        tta: int = 1,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.2,
        stem_stride: int = 1,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": lambda: nn.ReLU(inplace=True)}
        if act not in acts:
            raise UserError(f"fast_cnn arch.act must be one of {', '.join(acts)}, got {act!r}")
        # 2x2 patches of 3 channels = 12 dimensions; the whitening filters and their
        # negatives (24 channels) keep both signs alive through the nonlinearity.
        # stem_stride 2 whitens non-overlapping patches (a "patchify" stem): every later
        # layer then runs at a quarter of the pixels, ~4x cheaper, for some accuracy.
        self.whiten = nn.Conv2d(3, 24, 2, stride=stem_stride, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act0 = acts[act]()
        groups, c_in = [], 24
        for c_out in widths:
            groups.append(_ConvGroup(c_in, c_out, acts[act], bn_momentum, identity_init))
            c_in = c_out
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.logit_scale = logit_scale
        if not isinstance(tta, int) or int(tta) not in (0, 1, 2):  # bool is an int: false 0, true 1
            raise UserError(f"fast_cnn arch.tta must be 0, 1 or 2 (or false/true), got {tta!r}")
        self.tta = int(tta)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act0(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale

    def _mirror(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self._logits(x) + self._logits(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.tta == 0:
            return self._logits(x)
        if self.tta == 1:
            return self._mirror(x)
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * (self._mirror(padded[..., :h, :w]) + self._mirror(padded[..., 2:, 2:]))
        return 0.5 * (self._mirror(x) + shifted)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of ``x`` (normalized images).

        Args:
            x: a few thousand normalized training images (N, 3, H, W).
            eps: added to the patch-covariance eigenvalues (normalized units squared)
                so that near-zero directions are not amplified without bound.
        """
        k = self.whiten.kernel_size[0]
        patches = F.unfold(x.float(), k).transpose(1, 2).reshape(-1, 3 * k * k).double()
        mean = patches.mean(0)
        centred = patches - mean
        cov = centred.T @ centred / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        filters = eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]  # (12, 12): rows are filters
        w = torch.cat([filters, -filters])
        self.whiten.weight.copy_(w.reshape(-1, 3, k, k).to(self.whiten.weight))
        # Outputs centred on the data: bias = -W @ mean patch.
        assert self.whiten.bias is not None
        self.whiten.bias.copy_((-(w @ mean)).to(self.whiten.bias))


def fast_cnn(params: TrialParams, num_classes: int) -> nn.Module:
    """`FastCNN` from ``params.arch``: ``width`` multiplier (1.0 = 64/256/256) or ``widths``."""
    arch = params.arch
    if "widths" in arch:
        widths = tuple(int(w) for w in arch["widths"])
        if len(widths) != 3:
            raise UserError(f"fast_cnn arch.widths needs 3 values, got {arch['widths']!r}")
    else:
        m = float(arch.get("width", 1.0))
        widths = tuple(max(8, round(c * m)) for c in (64, 256, 256))
    return FastCNN(
        num_classes,
        widths=widths,  # type: ignore[arg-type]
        act=str(arch.get("act", "gelu")),
        tta=arch.get("tta", 1),
        logit_scale=float(arch.get("logit_scale", 1 / 9)),
        bn_momentum=float(arch.get("bn_momentum", 0.2)),
        stem_stride=int(arch.get("stem_stride", 1)),
        identity_init=bool(arch.get("identity_init", True)),
    )
