"""Batched augmentation on the training device: random per image, scaled by one knob.

    g = make_generator(data.device, seed=0)
    for x, y in train_batches(data, 512, strength=0.5, ops=("translate", "flip", "rotate", "cutout"), generator=g):
        loss = F.cross_entropy(model(x), y)

No PIL, no worker processes: the split lives on the device as one uint8 tensor
(see ``data.trial_data``); a batch is an index_select of a seeded permutation,
augmented as a whole with one random draw per image (never one draw for the whole
batch), then normalized. ``strength`` in [0, 1] scales every op:

- translate: shift by up to ``round(4 * strength)`` px in x and y (integers,
  uniform), the border mirrored (the edge pixel repeated, like reflect-padding
  then cropping a random 32x32 window);
- flip: horizontal, with probability 0.5 whenever strength > 0 (a mirrored
  photo is as natural as the original, so the probability is not scaled);
- rotate: by a uniform angle in +-30 * strength degrees about the centre,
  bilinear, border mirrored (a per-image affine sampling grid + ``grid_sample``);
- cutout: a square of side ``round(12 * strength)`` px filled with mid-grey
  (128/255, close to the data mean, so near 0 after normalization), its centre
  uniform over the image, so it may be partly outside (as in DeVries & Taylor
  2017): 0 to side**2 pixels are covered.

strength 0 (or no ops) is the identity up to the uint8 -> [0, 1] conversion.

Speed (measure with ``cifar-hpo bench data``): without rotation, translate and
flip are one index gather on the uint8 batch (exact, no interpolation); with
rotation, translate, flip and rotation are folded into one sampling grid, so
the batch is resampled once (grid_sample is then ~60% of the CPU time). In
``train_batches`` normalization is fused into the uint8 -> float conversion.
On a CPU, avoid mixed uint8/float kernels, broadcast masked_fill_ and
torch.stack on the hot path: each measured 3-5x slower than the form used here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from cifar_hpo.data import DeviceData
from cifar_hpo.params import AUG_OPS as OPS  # the op names live with TrialParams, which imports no torch

MAX_SHIFT_PX = 4  # translate at strength 1
MAX_DEGREES = 30.0  # rotate at strength 1
MAX_CUTOUT_PX = 12  # cutout side at strength 1
FLIP_P = 0.5
CUTOUT_FILL = 128  # uint8 units (0.502 in [0, 1] units)


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device``'s kind (a CUDA generator for CUDA data)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def augment(x: torch.Tensor, *, strength: float, ops: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """Augment a batch, each image with its own random draws.

    Args:
        x: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1], on the generator's device.
        strength: in [0, 1]; scales every op (see the module docstring); 0 = none.
        ops: subset of ``OPS``; the others are off.
        generator: source of all randomness (seeded -> reproducible batches).

    Returns:
        float32 (B, 3, H, W) in [0, 1], a new tensor (``x`` is not modified).

    Raises:
        ValueError: an unknown op, or strength outside [0, 1].
    """
    return _augment(x, strength, ops, generator, None, None)


def _augment(
    x: torch.Tensor,
    strength: float,
    ops: tuple[str, ...],
    generator: torch.Generator,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """``augment``, normalized with (mean, std) when given: one fewer pass over the batch.

    ``flips`` (bool per image), when given with the flip op, decides the flips instead of a draw.
    """
    bad = [op for op in ops if op not in OPS]
    if bad or not 0.0 <= strength <= 1.0:
        raise ValueError(f"augment: ops must be among {OPS} and strength in [0, 1], got ops={ops}, strength={strength}")
    shift = round(MAX_SHIFT_PX * strength) if "translate" in ops else 0
    flip = "flip" in ops and strength > 0
    degrees = MAX_DEGREES * strength if "rotate" in ops else 0.0
    side = round(MAX_CUTOUT_PX * strength) if "cutout" in ops else 0
    b, _, h, w = x.shape
    dev = x.device
    # Draws in a fixed order, each one value per image.
    dy = _randint(-shift, shift, b, generator, dev) if shift else None
    dx = _randint(-shift, shift, b, generator, dev) if shift else None
    if flip and flips is not None:
        flipped: torch.Tensor | None = flips
    else:
        flipped = torch.rand(b, generator=generator, device=dev) < FLIP_P if flip else None
    angles = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * math.radians(degrees) if degrees > 0 else None
    cy = _randint(0, h - 1, b, generator, dev) if side else None
    cx = _randint(0, w - 1, b, generator, dev) if side else None
    if angles is not None:
        # Bilinear weights sum to 1, so resampling commutes with the per-channel
        # normalization: normalize while converting to float (one pass), then resample.
        out = affine_resample(_convert(x, mean, std), dy, dx, flipped, angles)
        if cy is None or cx is None:
            return out
        grey = torch.full((1, x.shape[1], 1, 1), CUTOUT_FILL, dtype=torch.uint8, device=dev)
        return cutout_(out, cy, cx, side, _convert(grey, mean, std))  # the fill in the output's units
    # Whole-pixel shifts and flips are exact: one gather on the (uint8) batch.
    out = shift_flip(x, dy, dx, flipped) if (shift or flip) else x
    if cy is not None and cx is not None:
        out = out.clone(memory_format=torch.contiguous_format) if out is x else out  # keep the caller's x
        cutout_(out, cy, cx, side, CUTOUT_FILL if out.dtype == torch.uint8 else CUTOUT_FILL / 255.0)
    return _convert(out, mean, std)  # always a new tensor


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Return ``(x - mean) / std`` per channel as a new float32 tensor.

    Args:
        x: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1].
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
    """
    return _convert(x, mean, std)


def train_batches(
    data: DeviceData,
    batch_size: int,
    *,
    strength: float,
    ops: tuple[str, ...],
    generator: torch.Generator,
    drop_last: bool = True,
    flips: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented, normalized training batches, all on ``data.device``.

    The order is a permutation drawn from ``generator``, so the same generator
    state gives the same batches. With ``drop_last`` the last partial batch is
    dropped, unless it would be the only batch (a subset smaller than a batch).
    ``flips`` (bool, one per training image), with the flip op, says which images
    are mirrored this epoch instead of a random draw (`alternating_flips`).

    Yields:
        (x, y): float32 (B, 3, H, W) normalized with ``data.mean``/``data.std``; int64 (B,).
    """
    n = data.train_y.shape[0]
    perm = torch.randperm(n, generator=generator, device=data.train_x.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        chosen = flips.index_select(0, idx) if flips is not None else None
        x = _augment(data.train_x.index_select(0, idx), strength, ops, generator, data.mean, data.std, chosen)
        yield x, data.train_y.index_select(0, idx)


def alternating_flips(n: int, epoch: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Which of ``n`` training images to mirror in 1-based ``epoch``: a seeded coin per image
    in epoch 1, then each image mirrored in every other epoch (airbench's alternating flip,
    arXiv 2404.00498: every image is seen both ways in any two consecutive epochs).
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed * 7919 + 17)
    first = torch.rand(n, generator=g, device=torch.device(device)) < FLIP_P
    return first if epoch % 2 == 1 else ~first


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized, unaugmented batches of ``x`` in order (the last one may be partial)."""
    for start in range(0, x.shape[0], batch_size):
        yield normalize(x[start : start + batch_size], mean, std), y[start : start + batch_size]


# ---------------------------------------------------------------- the ops (explicit parameters)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """A new float32 copy in [0, 1] of uint8 (divided by 255) or float input."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32, copy=True)


def shift_flip(x: torch.Tensor, dy: torch.Tensor | None, dx: torch.Tensor | None, flipped: torch.Tensor | None) -> torch.Tensor:
    """Shift each image by (dy, dx) whole pixels and mirror the flipped ones, by one gather.

    out[b, :, i, j] = x[b, :, m(i + dy[b]), m(j' + dx[b])] with j' = W-1-j when
    flipped[b], else j, and m() mirroring indices outside the image (edge repeated).
    Works on any dtype (uint8 keeps the gather 4x cheaper than float).
    """
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    if dy is not None:
        rows = _mirror(rows + dy[:, None], h)
    if dx is not None:
        cols = _mirror(cols + dx[:, None], w)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, index).view(b, c, h, w)


def affine_resample(
    x: torch.Tensor,
    dy: torch.Tensor | None,
    dx: torch.Tensor | None,
    flipped: torch.Tensor | None,
    angles: torch.Tensor,
) -> torch.Tensor:
    """Rotate, shift and flip each (square) image in one bilinear resampling, the border mirrored.

    With all angles 0 this equals ``shift_flip`` (sample points fall on pixel
    centres, and grid_sample's reflection mirrors with the edge repeated).

    Args:
        x: float (B, C, H, W).
        dy, dx: int shifts in pixels, or None for none.
        flipped: bool per image, or None for none.
        angles: float per image, radians.
    """
    b, c, h, w = x.shape
    cos, sin = angles.cos(), angles.sin()
    fx = 1.0 - 2.0 * flipped.to(x.dtype) if flipped is not None else torch.ones_like(cos)
    zero = torch.zeros_like(cos)
    # Normalized coordinates span 2 units over W (or H) pixels: a shift of d px is 2d/W.
    tx = dx.to(x.dtype) * (2.0 / w) if dx is not None else zero
    ty = dy.to(x.dtype) * (2.0 / h) if dy is not None else zero
    # source = R(angle) @ diag(fx, 1) @ output + t, in grid_sample's normalized
    # coordinates (pixel centres at (2k + 1) / n - 1). Built by broadcasting
    # (B, H, 1) + (B, 1, W): 3x cheaper on CPU than affine_grid's batched matmul.
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    grid = torch.empty(b, h, w, 2, dtype=x.dtype, device=x.device)
    # Each plane written in place (out=): torch.stack of the planes, or one
    # broadcast add into (B, H, W, 2), costs ~3x more on CPU.
    torch.add(((-sin)[:, None] * ys + tx[:, None])[:, :, None], ((fx * cos)[:, None] * xs)[:, None, :], out=grid[..., 0])
    torch.add((cos[:, None] * ys + ty[:, None])[:, :, None], ((fx * sin)[:, None] * xs)[:, None, :], out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def cutout_(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, side: int, fill: float | torch.Tensor) -> torch.Tensor:
    """Set a ``side`` x ``side`` square centred at (cy[b], cx[b]) of each image to ``fill``, in place.

    The square's top-left corner is (cy - side // 2, cx - side // 2); parts
    outside the image are dropped. ``fill`` is a number in x's units or a
    (1, C, 1, 1) tensor of per-channel values. ``x`` must be contiguous.
    """
    b, c, h, w = x.shape
    steps = torch.arange(side, device=x.device)
    # Clamping maps the square's parts outside the image onto its own pixels on
    # the border (the centre is always inside), so only the visible part is written.
    rows = (cy[:, None] - side // 2 + steps).clamp_(0, h - 1)  # (B, side)
    cols = (cx[:, None] - side // 2 + steps).clamp_(0, w - 1)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, side * side).expand(b, c, side * side)
    if isinstance(fill, torch.Tensor):
        value = fill.to(x.dtype).view(1, c, 1).expand(b, c, side * side)
    else:
        value = torch.full((1, 1, 1), fill, dtype=x.dtype, device=x.device).expand(b, c, side * side)
    # A scatter writes B * C * side**2 values; a full-size mask and torch.where
    # or masked_fill_ cost 3-4x more on CPU.
    x.view(b, c, h * w).scatter_(2, index, value)
    return x


# ---------------------------------------------------------------- helpers


def _convert(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """A new float32 tensor: x in [0, 1] units, normalized when mean and std are given."""
    if mean is None or std is None:
        return to_float(x)
    scale, bias = _scale_bias(tuple(float(m) for m in mean), tuple(float(s) for s in std), x.dtype == torch.uint8, x.device)
    out = x.to(torch.float32, copy=True)
    # x * scale + bias per channel, in place on the copy: addcmul reading uint8
    # directly is ~5x slower on CPU (no vectorized mixed-dtype kernel).
    return torch.addcmul(bias, out, scale, out=out)


@functools.lru_cache(maxsize=16)
def _scale_bias(
    mean: tuple[float, ...], std: tuple[float, ...], from_uint8: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) tensors with x * scale + bias = (x / unit - mean) / std, made once per device."""
    unit = 255.0 if from_uint8 else 1.0
    scale = torch.tensor([1.0 / (unit * s) for s in std], dtype=torch.float32, device=device)
    bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32, device=device)
    return scale.view(1, -1, 1, 1), bias.view(1, -1, 1, 1)


def _randint(low: int, high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` uniform integers in [low, high] (both ends included)."""
    return torch.randint(low, high + 1, (n,), generator=generator, device=device)


def _mirror(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices outside 0..n-1 back inside by mirroring, the edge repeated (-1 -> 0, n -> n-1)."""
    i = i.remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)
