"""Data sources, the decoded-array cache, stratified splits, device tensors and bad input."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from cifar_hpo import cli, data
from cifar_hpo.errors import UserError

# ---------------------------------------------------------------- helpers


def load(source: Path | str, tmp_path: Path, **kw: object) -> data.Dataset:
    return data.load_dataset(str(source), cache_dir=tmp_path / "cache", progress=False, **kw)


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts images decoded in this process (the serial path, used below 4000 images)."""
    calls = [0]
    real = data.decode_image

    def counting(name: str, payload: bytes | Path) -> np.ndarray:
        calls[0] += 1
        return real(name, payload)

    monkeypatch.setattr(data.decode, "decode_image", counting)
    return calls


def make_tar(folder: Path, out: Path, mode: str) -> Path:
    with tarfile.open(out, mode) as tf:
        tf.add(folder, arcname=folder.name)
    return out


def make_batches(folder: Path, classes: tuple[str, ...] = ("ant", "bee", "cow"), per_batch: int = 6) -> Path:
    """A cifar-10-batches-py folder with random images; pixel [0, 0, 0] of image 0 of each file is set."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name in data.sources.BATCH_FILES:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        x[0, 0], x[0, 1024], x[0, 2048] = 11, 22, 33  # R, G, B of pixel (0, 0)
        labels = [i % len(classes) for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": labels}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f, protocol=2)
    return folder


def no_temp_files(cache: Path) -> bool:
    return not cache.exists() or not any(p.name.endswith(".tmp") for p in cache.iterdir())


# ---------------------------------------------------------------- sources


def test_image_folder_loads(image_folder: Path, tmp_path: Path) -> None:
    ds = load(image_folder, tmp_path)
    assert ds.classes == ("cat", "dog", "frog")
    assert ds.train_x.shape == (60, 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (18, 32, 32, 3)
    assert ds.train_y.dtype == np.int64
    assert np.bincount(ds.train_y).tolist() == [20, 20, 20]
    assert np.bincount(ds.test_y).tolist() == [6, 6, 6]
    # The fixture colours class i by channel i: labels must follow the folders.
    assert (ds.train_x[ds.train_y == 1][..., 1].mean()) > 150
    assert len(ds.key) == 64 and ds.source == str(image_folder)


def test_folder_one_level_down_is_found(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "outer" / "inner", n_train=2, n_test=1)
    ds = load(tmp_path / "outer", tmp_path)
    assert ds.train_x.shape[0] == 6


def test_other_sizes_and_modes_become_32px_rgb(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "big", classes=("a", "b"), n_train=2, n_test=1, size=48)
    Image.new("L", (20, 10), 200).save(root / "train" / "a" / "gray.png")
    Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(root / "train" / "b" / "alpha.png")
    ds = load(root, tmp_path)
    assert ds.train_x.shape == (6, 32, 32, 3)
    gray = ds.train_x[2]  # sorted within class a: 0000, 0001, gray
    assert (gray == 200).all()


def test_classes_come_from_the_data(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "five", classes=("v", "w", "x", "y", "z"), n_train=2, n_test=1)
    ds = load(root, tmp_path)
    assert ds.classes == ("v", "w", "x", "y", "z")


@pytest.mark.parametrize(("suffix", "mode"), [(".tar", "w"), (".tar.gz", "w:gz")])
def test_archive_equals_folder(image_folder: Path, tmp_path: Path, suffix: str, mode: str) -> None:
    archive = make_tar(image_folder, tmp_path / f"imgs{suffix}", mode)
    from_folder = load(image_folder, tmp_path)
    from_archive = load(archive, tmp_path)
    assert from_archive.classes == from_folder.classes
    np.testing.assert_array_equal(from_archive.train_x, from_folder.train_x)
    np.testing.assert_array_equal(from_archive.test_y, from_folder.test_y)


def test_archive_with_files_at_top_level(image_folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tf:
        for split in ("train", "test"):
            tf.add(image_folder / split, arcname=f"./{split}")
    assert load(archive, tmp_path).train_x.shape[0] == 60


def test_batches_folder(tmp_path: Path) -> None:
    folder = make_batches(tmp_path / "cifar-10-batches-py")
    ds = load(folder, tmp_path)
    assert ds.classes == ("ant", "bee", "cow")
    assert ds.train_x.shape == (30, 32, 32, 3) and ds.test_x.shape == (6, 32, 32, 3)
    assert ds.train_x[0, 0, 0].tolist() == [11, 22, 33]  # channel planes -> HWC
    assert ds.test_y.tolist() == [0, 1, 2, 0, 1, 2]
    assert load(tmp_path, tmp_path).key == ds.key  # the folder holding it works too


def test_batches_refuse_pickled_code(tmp_path: Path) -> None:
    folder = make_batches(tmp_path / "cifar-10-batches-py")
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": os.system}, f)
    with pytest.raises(UserError, match="data_batch_2"):
        load(folder, tmp_path)


def test_cifar10_uses_planted_batches_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_batches(tmp_path / "dl" / "cifar-10-batches-py")

    def no_network(*args: object, **kw: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ds = load("cifar10", tmp_path, data_dir=tmp_path / "dl")
    assert ds.classes == ("ant", "bee", "cow") and ds.source == "cifar10"
    monkeypatch.setenv("CIFAR_HPO_CACHE", str(tmp_path / "home"))
    shutil.copytree(tmp_path / "dl", tmp_path / "home" / "data")
    ds2 = data.load_dataset("cifar10", progress=False)  # default data and cache dirs under $CIFAR_HPO_CACHE
    assert ds2.train_x.shape == ds.train_x.shape
    assert list((tmp_path / "home" / "decoded").glob("*.npz"))


def test_cifar10_download_failure_is_one_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(request: object, *args: object, **kw: object) -> None:
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="could not download CIFAR-10") as e:
        load("cifar10", tmp_path, data_dir=tmp_path / "dl")
    assert "\n" not in str(e.value)
    assert calls and "cifar-10-python.tar.gz" in str(calls[0])  # torchvision's real download code ran


# ---------------------------------------------------------------- cache


def test_second_load_reads_the_cache(image_folder: Path, tmp_path: Path, decode_counter: list[int]) -> None:
    first = load(image_folder, tmp_path)
    assert decode_counter[0] == 78
    second = load(image_folder, tmp_path)
    assert decode_counter[0] == 78  # nothing decoded again
    np.testing.assert_array_equal(first.train_x, second.train_x)
    assert second.classes == first.classes and second.key == first.key
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"


def test_changed_file_is_decoded_again(image_folder: Path, tmp_path: Path, decode_counter: list[int]) -> None:
    first = load(image_folder, tmp_path)
    target = image_folder / "train" / "cat" / "0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    second = load(image_folder, tmp_path)
    assert second.key != first.key
    assert decode_counter[0] == 2 * 78
    assert second.train_x[0, 0, 0].tolist() == [1, 2, 3]


def test_archive_key_is_its_content(image_folder: Path, tmp_path: Path, decode_counter: list[int]) -> None:
    archive = make_tar(image_folder, tmp_path / "a.tar.gz", "w:gz")
    first = load(archive, tmp_path)
    copy = tmp_path / "elsewhere" / "a.tar.gz"
    copy.parent.mkdir()
    shutil.copy(archive, copy)
    os.utime(copy, ns=(5, 5))
    assert load(copy, tmp_path).key == first.key  # same bytes, other path and mtime: a hit
    assert decode_counter[0] == 78
    (image_folder / "train" / "cat" / "0000.png").unlink()
    make_tar(image_folder, archive, "w:gz")
    assert load(archive, tmp_path).key != first.key
    assert decode_counter[0] == 78 + 77


def test_damaged_cache_file_is_rebuilt(image_folder: Path, tmp_path: Path, decode_counter: list[int]) -> None:
    load(image_folder, tmp_path)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    ds = load(image_folder, tmp_path)
    assert decode_counter[0] == 2 * 78 and ds.train_x.shape[0] == 60


def test_failed_cache_write_leaves_no_temp_file(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        load(image_folder, tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []


def test_parallel_decoding_matches_serial(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = load(image_folder, tmp_path / "s")
    monkeypatch.setattr(data.decode, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(data.decode, "cpu_threads", lambda: 4)
    parallel = load(image_folder, tmp_path / "p")
    np.testing.assert_array_equal(serial.train_x, parallel.train_x)
    np.testing.assert_array_equal(serial.test_x, parallel.test_x)
    (image_folder / "test" / "dog" / "0003.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="0003.png"):
        load(image_folder, tmp_path / "p")


# ---------------------------------------------------------------- splits


@pytest.fixture
def ds10(tmp_path: Path) -> data.Dataset:
    """10 classes of unequal size (30..120 images), test images distinct from train."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), np.arange(30, 130, 10))
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    test_y = np.repeat(np.arange(10), 5)
    test_x = np.full((len(test_y), 32, 32, 3), 7, dtype=np.uint8)
    return data.Dataset(x, y, test_x, test_y, tuple(f"c{i}" for i in range(10)), "synthetic", "k" * 64)


def test_split_is_stratified_and_disjoint(ds10: data.Dataset) -> None:
    split = data.split_dataset(ds10, val_fraction=0.2, seed=1)
    n = len(ds10.train_y)
    assert len(split.val_idx) == round(n * 0.2)
    assert len(np.intersect1d(split.train_idx, split.val_idx)) == 0
    assert len(split.train_idx) + len(split.val_idx) == n
    per_class = np.bincount(ds10.train_y)
    val_per_class = np.bincount(ds10.train_y[split.val_idx], minlength=10)
    assert np.all(np.abs(val_per_class - per_class * 0.2) <= 1)


def test_split_is_seeded_and_hashed(ds10: data.Dataset) -> None:
    a = data.split_dataset(ds10, seed=3)
    b = data.split_dataset(ds10, seed=3)
    c = data.split_dataset(ds10, seed=4)
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    assert a.hash == b.hash and len(a.hash) == 16
    assert not np.array_equal(a.val_idx, c.val_idx) and a.hash != c.hash
    other_data = dataclasses.replace(ds10, key="j" * 64)
    assert data.split_dataset(other_data, seed=3).hash != a.hash


def test_default_split_is_nine_to_one(ds10: data.Dataset) -> None:
    split = data.split_dataset(ds10)
    assert (split.seed, split.val_fraction, split.subset) == (42, 0.1, None)
    assert len(split.val_idx) == round(len(ds10.train_y) * 0.1)


def test_subset_is_stratified_then_split(ds10: data.Dataset) -> None:
    split = data.split_dataset(ds10, subset=300, seed=0)
    chosen = np.concatenate([split.train_idx, split.val_idx])
    assert len(chosen) == 300 and len(split.val_idx) == 30 and split.subset == 300
    share = np.bincount(ds10.train_y[chosen], minlength=10) / 300
    assert np.allclose(share, np.bincount(ds10.train_y) / len(ds10.train_y), atol=1 / 300 + 1e-9)
    assert split.hash != data.split_dataset(ds10, seed=0).hash


@pytest.mark.parametrize("kw", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"subset": 0}, {"subset": 10**6}])
def test_bad_split_arguments(ds10: data.Dataset, kw: dict[str, float]) -> None:
    with pytest.raises(UserError):
        data.split_dataset(ds10, **kw)


def test_trial_data_never_touches_test(ds10: data.Dataset) -> None:
    split = data.split_dataset(ds10)
    # With the test arrays gone, any access would raise.
    no_test = dataclasses.replace(ds10, test_x=None, test_y=None)
    d = data.trial_data(no_test, split, torch.device("cpu"))
    assert d.eval_name == "val" and d.split_hash == split.hash
    assert d.train_x.shape == (len(split.train_idx), 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.eval_x.shape[0] == len(split.val_idx) and d.train_y.dtype == torch.int64
    assert not (d.eval_x == 7).all(dim=(1, 2, 3)).any()  # no test image (all 7s) among the eval images
    assert d.num_classes == 10 and d.device.type == "cpu"
    np.testing.assert_array_equal(d.train_x[0].permute(1, 2, 0).numpy(), ds10.train_x[split.train_idx[0]])
    flat = ds10.train_x[split.train_idx].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(d.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(d.std, flat.std(0), rtol=1e-6)


def test_final_data_is_train_plus_val_against_test(ds10: data.Dataset) -> None:
    split = data.split_dataset(ds10)
    d = data.final_data(ds10, split, torch.device("cpu"))
    assert d.eval_name == "test" and d.train_x.shape[0] == len(ds10.train_y)
    assert (d.eval_x == 7).all() and d.eval_y.tolist() == ds10.test_y.tolist()


# ---------------------------------------------------------------- bad input


def _bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source, text the one-line error must contain)."""

    def tree(name: str) -> Path:
        return make_image_folder(tmp_path / name, n_train=3, n_test=2)

    no_test = tree("no_test")
    shutil.rmtree(no_test / "test")
    empty = tree("empty_class")
    for f in (empty / "train" / "dog").iterdir():
        f.unlink()
    not_image = tree("not_image")
    (not_image / "train" / "cat" / "notes.png").write_text("hello")
    truncated = tree("truncated")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (truncated / "test" / "frog" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    classes = tree("mismatch")
    shutil.rmtree(classes / "test" / "frog")
    fake = tmp_path / "x.tar.gz"
    fake.write_text("this is not an archive\n")
    broken = make_tar(tree("for_tar"), tmp_path / "broken.tar.gz", "w:gz")
    broken.write_bytes(broken.read_bytes()[:-200])
    bad_member = tree("member")
    (bad_member / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "missing": (tmp_path / "nowhere", "nowhere"),
        "no test/": (no_test, "no test/"),
        "empty class": (empty, "train/dog"),
        "not an image": (not_image, "notes.png"),
        "truncated": (truncated, "cut.jpg"),
        "different classes": (classes, "only in train: frog"),
        "not an archive": (fake, "x.tar.gz"),
        "damaged archive": (broken, "broken.tar.gz"),
        "bad member": (make_tar(bad_member, tmp_path / "member.tar", "w"), "member/train/dog/bad.png"),
    }


BAD = [
    "missing",
    "no test/",
    "empty class",
    "not an image",
    "truncated",
    "different classes",
    "not an archive",
    "damaged archive",
    "bad member",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_user_error(tmp_path: Path, case: str) -> None:
    source, names = _bad_sources(tmp_path)[case]
    with pytest.raises(UserError) as e:
        load(source, tmp_path)
    message = str(e.value)
    assert names in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("case", BAD)
def test_bad_input_through_the_cli(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    source, names = _bad_sources(tmp_path)[case]
    cache = tmp_path / "cache"
    code = cli.main(["explore", "--data", str(source), "--out", str(tmp_path / "out"), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cifar-hpo: error: ") and names in err
    assert "Traceback" not in err
    assert not cache.exists() or list(cache.iterdir()) == []
    assert no_temp_files(cache)


# ---------------------------------------------------------------- the bench


def test_bench_data_runs(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "data", "--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    assert cli.main([*argv, "--batch-size", "8", "--seconds", "0.3", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ours_img_s"] > 0 and result["reference_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_img_s"] / result["reference_img_s"])
    assert result["batch_size"] == 8 and result["device"] == "cpu"


def test_bench_data_on_an_archive(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = make_tar(image_folder, tmp_path / "imgs.tar.gz", "w:gz")
    argv = ["bench", "data", "--data", str(archive), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    assert cli.main([*argv, "--batch-size", "8", "--seconds", "0.2"]) == 0
    assert "ImageFolder of imgs.tar.gz unpacked" in capsys.readouterr().out


def test_bench_unpack_stays_inside(tmp_path: Path) -> None:
    from cifar_hpo.bench.data import unpack

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("../escaped.txt", "ok/inside.txt", "/abs.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack(archive, dest)
    assert (dest / "ok" / "inside.txt").read_bytes() == b"hi"
    assert not (tmp_path / "escaped.txt").exists() and not Path("/abs.txt").exists()


# ---------------------------------------------------------------- the real archive


@pytest.mark.slow
def test_real_archive_end_to_end(shared_archive: Path, tmp_path: Path) -> None:
    from cifar_hpo.training import augment

    ds = data.load_dataset(str(shared_archive), cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes[:3] == ("airplane", "automobile", "bird") and len(ds.classes) == 10
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (5000, 32, 32, 3)
    split = data.split_dataset(ds)
    assert (len(split.train_idx), len(split.val_idx)) == (45000, 5000)
    assert np.bincount(ds.train_y[split.val_idx]).tolist() == [500] * 10
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = data.trial_data(ds, split, device)
    g = augment.make_generator(device, 0)
    x, y = next(augment.train_batches(d, 256, strength=0.5, ops=augment.OPS, generator=g))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == device.type
    assert abs(float(x.mean())) < 0.3 and y.shape == (256,)
