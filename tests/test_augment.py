"""Batched device augmentation: invariants, per-image randomness, seeding, geometry."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_hpo.data import DeviceData
from cifar_hpo.training import augment
from cifar_hpo.training.augment import OPS, affine_resample, cutout_, make_generator, shift_flip


def gen(seed: int = 0) -> torch.Generator:
    return make_generator("cpu", seed)


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, 32, 32) random images (no symmetry, so every op shows)."""
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def device_data(n: int = 100) -> DeviceData:
    x = images(n)
    y = torch.arange(n) % 4
    return DeviceData(x, y, x[:10], y[:10], "val", ("a", "b", "c", "d"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "h")


def test_strength_zero_is_identity() -> None:
    x = images()
    for ops in (OPS, ()):
        out = augment.augment(x, strength=0.0, ops=ops, generator=gen())
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, x.float() / 255)
    torch.testing.assert_close(augment.augment(x, strength=1.0, ops=(), generator=gen()), x.float() / 255)


def test_output_shape_dtype_range_and_input_untouched() -> None:
    x = images()
    before = x.clone()
    for strength in (0.25, 0.5, 1.0):
        out = augment.augment(x, strength=strength, ops=OPS, generator=gen())
        assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
    xf = x.float() / 255
    augment.augment(xf, strength=1.0, ops=OPS, generator=gen())
    assert torch.equal(x, before) and torch.equal(xf, before.float() / 255)


@pytest.mark.parametrize("op", OPS)
def test_each_op_alone_changes_images_only_when_on(op: str) -> None:
    x = images(32)
    identity = x.float() / 255
    on = augment.augment(x, strength=1.0, ops=(op,), generator=gen())
    changed = (on != identity).flatten(1).any(1)
    assert changed.any()
    if op == "flip":  # each image is either untouched or exactly mirrored
        mirrored = (on == identity.flip(3)).flatten(1).all(1)
        assert bool((~changed | mirrored).all()) and (~changed).any()
    if op == "cutout":  # changed pixels are the fill value, inside one square of side 12
        diff = (on != identity).any(1)
        assert bool((on.permute(0, 2, 3, 1)[diff] == augment.CUTOUT_FILL / 255).all())
        assert int(diff.sum(dim=(1, 2)).max()) <= 12 * 12
    others = tuple(o for o in OPS if o != op)
    off = augment.augment(x, strength=0.0, ops=OPS, generator=gen())
    torch.testing.assert_close(off, identity)
    assert not torch.equal(augment.augment(x, strength=1.0, ops=others, generator=gen()), on)


@pytest.mark.parametrize("ops", [(op,) for op in OPS] + [OPS])
def test_identical_images_get_different_transforms(ops: tuple[str, ...]) -> None:
    x = images(1).expand(64, -1, -1, -1).contiguous()
    out = augment.augment(x, strength=1.0, ops=ops, generator=gen())
    distinct = {tuple(img.flatten()[::7].tolist()) for img in out}
    assert len(distinct) > 1  # never one draw for the whole batch
    if ops != ("flip",):
        assert len(distinct) > 8


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    d = device_data()

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(augment.train_batches(d, 32, strength=0.5, ops=OPS, generator=gen(seed)))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert len(a) == 3  # 100 images, batch 32, last partial batch dropped
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])


def test_train_batches_order_labels_and_normalization() -> None:
    d = device_data()
    batches = list(augment.train_batches(d, 32, strength=0.0, ops=OPS, generator=gen(5), drop_last=False))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    perm = torch.randperm(100, generator=gen(5))
    x = torch.cat([b[0] for b in batches])
    expected = augment.normalize(d.train_x[perm], d.mean, d.std)
    torch.testing.assert_close(x, expected)
    assert torch.equal(torch.cat([b[1] for b in batches]), d.train_y[perm])
    assert x.dtype == torch.float32 and batches[0][1].dtype == torch.int64


def test_small_data_still_gives_one_batch() -> None:
    d = device_data(10)
    batches = list(augment.train_batches(d, 32, strength=1.0, ops=OPS, generator=gen()))
    assert len(batches) == 1 and batches[0][0].shape[0] == 10


def test_normalize_and_eval_batches() -> None:
    x = images(10)
    mean = tuple(float(v) for v in (x.float() / 255).mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in (x.float() / 255).std(dim=(0, 2, 3), correction=0))
    z = augment.normalize(x, mean, std)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.normalize(x.float() / 255, mean, std), z)
    y = torch.arange(10)
    got = list(augment.eval_batches(x, y, 4, mean, std))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    torch.testing.assert_close(torch.cat([b[0] for b in got]), z)


def test_shift_flip_geometry() -> None:
    x = images(2)
    one, zero = torch.tensor([1, 0]), torch.tensor([0, 0])
    out = shift_flip(x, one, zero, None)  # image 0 shifted up by one row (reads row i + 1)
    assert torch.equal(out[0, :, :31], x[0, :, 1:]) and torch.equal(out[0, :, 31], x[0, :, 31])  # mirrored edge
    assert torch.equal(out[1], x[1])
    flipped = shift_flip(x, None, None, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])


def test_affine_path_agrees_with_gather_path_at_zero_angle() -> None:
    x = images(8)
    g = gen(3)
    dy = torch.randint(-4, 5, (8,), generator=g)
    dx = torch.randint(-4, 5, (8,), generator=g)
    flipped = torch.rand(8, generator=g) < 0.5
    gathered = shift_flip(x, dy, dx, flipped).float() / 255
    resampled = affine_resample(x.float() / 255, dy, dx, flipped, torch.zeros(8))
    torch.testing.assert_close(resampled, gathered, atol=1e-5, rtol=0)


def test_rotation_by_quarter_turn_is_rot90() -> None:
    x = images(2).float() / 255
    out = affine_resample(x, None, None, None, torch.full((2,), math.pi / 2))
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))


def test_cutout_square() -> None:
    x = torch.zeros(2, 3, 32, 32)
    cutout_(x, torch.tensor([16, 0]), torch.tensor([16, 0]), 6, 0.5)
    assert int((x[0, 0] == 0.5).sum()) == 36 and bool((x[0, :, 13:19, 13:19] == 0.5).all())
    assert int((x[1, 0] == 0.5).sum()) == 9  # corner: only the part inside the image


def test_bad_ops_or_strength() -> None:
    with pytest.raises(ValueError):
        augment.augment(images(2), strength=0.5, ops=("shear",), generator=gen())
    with pytest.raises(ValueError):
        augment.augment(images(2), strength=1.5, ops=OPS, generator=gen())


@pytest.mark.gpu
def test_cuda_batches_with_cuda_generator() -> None:
    d = device_data()
    d = DeviceData(d.train_x.cuda(), d.train_y.cuda(), d.eval_x.cuda(), d.eval_y.cuda(), "val", d.classes, d.mean, d.std, "h")
    g = make_generator(d.device, 0)
    x, y = next(augment.train_batches(d, 32, strength=1.0, ops=OPS, generator=g))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and x.shape == (32, 3, 32, 32)


def test_alternating_flips_mirror_each_image_in_every_other_epoch() -> None:
    first, second, third = (augment.alternating_flips(1000, e, seed=3, device="cpu") for e in (1, 2, 3))
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert 400 < int(first.sum()) < 600  # a coin per image in the first epoch
    assert not torch.equal(first, augment.alternating_flips(1000, 1, seed=4, device="cpu"))
    # train_batches mirrors exactly the images the flips say (strength > 0 with only the flip op).
    d = device_data()
    flips = augment.alternating_flips(100, 2, seed=0, device="cpu")
    batches = list(augment.train_batches(d, 50, strength=1.0, ops=("flip",), generator=gen(1), flips=flips))
    perm = torch.randperm(100, generator=gen(1))
    got = torch.cat([b[0] for b in batches])
    plain = augment.normalize(d.train_x[perm], d.mean, d.std)
    want = torch.where(flips[perm][:, None, None, None], plain.flip(-1), plain)
    torch.testing.assert_close(got, want)
