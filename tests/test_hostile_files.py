"""Hostile files and bad inputs around checkpoints, data, export and predict (issue 20, item 5).

Files from outside (final.pt, model.pt2, model.onnx, classes.json, image folders, archives) are
untrusted: every size read from them is bounded before anything is allocated from it, and every
mistake is one line (``cifar-hpo: error: ...``, exit 2) with nothing written. Where old code would
allocate without bound, the allocating function is replaced by one that fails the test instead.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_image_folder, retrained_demo

from cifar_hpo import cli, data
from cifar_hpo.commands import export as export_command
from cifar_hpo.data import decode, sources
from cifar_hpo.deploy import predict
from cifar_hpo.errors import UserError
from cifar_hpo.models import final as finalmodel
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint, database

GRADIENT = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)  # every 8-bit value, 4 times


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A final.pt of the baseline defaults (1 seed, 1 epoch) on a 3-class synthetic folder."""
    made = retrained_demo(tmp_path_factory.mktemp("hostile"), n_train=8, n_test=2)
    made.obj = finalmodel.load_final(made.final)
    return made


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> str:
    """Run the CLI: exit 2, one line on stderr holding ``fragment``, nothing on stdout."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and not out, (code, out, err)
    return err


@pytest.fixture
def no_image_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test where predict would read (and allocate) an image at a size taken from a model file."""

    def refuse(path: Path, size: tuple[int, int]) -> np.ndarray:
        raise AssertionError(f"an image of {size} was allocated from a size the model file declares")

    monkeypatch.setattr(predict, "read_image", refuse)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty read-only tmpfs (root is not stopped by chmod, a read-only file system stops everyone)."""
    target = tmp_path / "ro"
    target.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here; the cases under a regular file still run")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a read-only tmpfs is not allowed here ({mounted.stderr.strip()}); the cases under a regular file still run")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def _edited(made: SimpleNamespace, tmp_path: Path, **change: Any) -> Path:
    path = tmp_path / "edited.pt"
    checkpoint.save({**made.obj, **change}, path)
    return path


# ---------------------------------------------------------------- 1. sizes read from model files


@pytest.mark.parametrize("size", [[3, 1_000_000, 1_000_000], [3, 64, 64], [1, 32, 32]])
def test_a_final_checkpoint_of_another_input_size_is_refused_before_any_image_is_made(
    made: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_image_allocated: None, size: list[int]
) -> None:
    bad = _edited(made, tmp_path, input_size=size)
    _fails(capsys, ["predict", "--checkpoint", str(bad), str(made.image)], "input_size must be [3, 32, 32]")


@pytest.fixture
def meta_builds_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test where a model is built for real (allocated) before its shapes were checked against the weights."""
    real_build = finalmodel.build

    def meta_only(params: Any, num_classes: int) -> torch.nn.Module:
        assert torch.get_default_device().type == "meta", f"a {params.model} of {num_classes} classes was allocated from the file's sizes"
        return real_build(params, num_classes)

    monkeypatch.setattr(finalmodel, "build", meta_only)


def test_a_class_count_beyond_the_weights_is_refused_before_the_model_is_built(
        made: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], meta_builds_only: None) -> None:  # fmt: skip
    names = [f"c{i}" for i in range(5000)]  # a head of 5000 outputs, while the weights are for 3
    bad = _edited(made, tmp_path, classes=names, num_classes=len(names))
    _fails(capsys, ["predict", "--checkpoint", str(bad), str(made.image)], "do not fit model 'baseline_cnn'")


def test_parameters_describing_far_more_layers_than_the_weights_hold_are_refused(made: SimpleNamespace, meta_builds_only: None) -> None:
    params = TrialParams(model="mlp", arch={"depth": 30})  # within the arch bounds: 62 tensors, where the file holds 10
    with pytest.raises(UserError, match="more than 36 weight tensors"):
        finalmodel.build_model({**made.obj, "params": params.to_dict()})


def _tiny_onnx(path: Path, input_shape: list[Any], classes: list[str] | None) -> Path:
    """An ONNX model (images -> mean colour per channel, softmaxed: 3 outputs) declaring ``input_shape``."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["probabilities"], axis=1)]  # fmt: skip
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if classes is not None:
        model.metadata_props.add(key="classes", value=json.dumps(classes))
    onnx.save(model, str(path))
    return path


def test_an_onnx_model_of_another_input_size_is_refused_before_any_image_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_image_allocated: None, image_folder: Path) -> None:  # fmt: skip
    model = _tiny_onnx(tmp_path / "model.onnx", ["batch", 3, 1_000_000, 1_000_000], ["a", "b", "c"])
    image = next(image_folder.rglob("*.png"))
    _fails(capsys, ["predict", "--checkpoint", str(model), str(image)], "takes images of size [3, 1000000, 1000000]")


def _program(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A model.pt2 (a 3-class baseline) whose extra files are ``extra``, as another tool could write them."""
    from cifar_hpo import models

    module = finalmodel.Deployed(models.build(models.default_params("baseline_cnn"), 3), [0.5] * 3, [0.25] * 3).eval()
    program = torch.export.export(module, (torch.rand(2, 3, 32, 32),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path), extra_files=extra)
    return path


@pytest.mark.parametrize("size", ["[3, 1000000, 1000000]", "[3, 64, 64]", "not json"])
def test_a_program_declaring_another_input_size_is_refused_before_any_image_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_image_allocated: None, image_folder: Path, size: str) -> None:  # fmt: skip
    model = _program(tmp_path, {"input_size.json": size, "classes.json": json.dumps(["a", "b", "c"])})
    _fails(capsys, ["predict", "--checkpoint", str(model), str(next(image_folder.rglob("*.png")))], "takes images of size")


def test_class_names_that_do_not_match_the_outputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    image = tmp_path / "blue.png"
    Image.fromarray(np.full((32, 32, 3), (0, 0, 255), dtype=np.uint8)).save(image)  # the third output wins
    model = _tiny_onnx(tmp_path / "model.onnx", ["batch", 3, 32, 32], ["a", "b"])
    _fails(capsys, ["predict", "--checkpoint", str(model), str(image)], "gives outputs of shape (3,) for 2 class names")


def test_a_classes_json_beside_a_model_is_bounded_and_must_be_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    image_folder: Path) -> None:  # fmt: skip
    model = _tiny_onnx(tmp_path / "model.onnx", ["batch", 3, 32, 32], None)  # no names inside: classes.json beside it is read
    image = str(next(image_folder.rglob("*.png")))
    beside = tmp_path / "classes.json"
    beside.write_text(json.dumps(["a", "b", "c"] + ["x" * 100] * 20_000))  # 2 MB
    _fails(capsys, ["predict", "--checkpoint", str(model), image], "more than class names take (at most 1,048,576 are read)")
    beside.write_text("[not json")
    _fails(capsys, ["predict", "--checkpoint", str(model), image], "are not a list of strings")
    beside.write_text(json.dumps(["a", "b", "c"]))
    assert cli.main(["predict", "--checkpoint", str(model), image]) == 0


# ---------------------------------------------------------------- zip bombs and the legacy format


def test_a_final_checkpoint_with_compressed_members_is_refused(made: SimpleNamespace, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import zipfile

    deflated = tmp_path / "final.pt"  # torch.load inflates such members: a small file could expand without bound
    with zipfile.ZipFile(made.final) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member.filename))
    _fails(capsys, ["predict", "--checkpoint", str(deflated), str(made.image)], "is compressed, which torch never writes")


def test_a_final_checkpoint_in_the_legacy_format_is_refused(made: SimpleNamespace, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    legacy = tmp_path / "final.pt"  # its storages are allocated at the sizes the file declares
    torch.save(made.obj, legacy, _use_new_zipfile_serialization=False)
    _fails(capsys, ["predict", "--checkpoint", str(legacy), str(made.image)], "cannot be loaded safely: it is not the zip archive")


def test_zip_members_claiming_more_than_the_file_are_refused(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "overlap.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"x" * 1000)
    blob = path.read_bytes()
    # A second central-directory entry pointing at the same member: each claims the file's bytes.
    start = blob.index(b"PK\x01\x02")
    end = blob.index(b"PK\x05\x06")
    entry = blob[start:end]
    record = bytearray(blob[end:])
    record[8:10] = record[10:12] = (2).to_bytes(2, "little")  # entries on this disk, in total
    record[12:16] = (2 * len(entry)).to_bytes(4, "little")  # size of the central directory
    path.write_bytes(blob[:start] + entry + entry.replace(b"data.pkl", b"data.pk2") + bytes(record))
    problem = finalmodel.zip_problem(path)
    assert problem is not None and "more than the" in problem


# ---------------------------------------------------------------- 2. a newer format


def test_a_final_checkpoint_of_a_newer_format_says_to_upgrade(made: SimpleNamespace, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    newer = _edited(made, tmp_path, format_version=99)
    _fails(capsys, ["predict", "--checkpoint", str(newer), str(made.image)], "written by a newer cifar-hpo")
    err = _fails(capsys, ["predict", "--checkpoint", str(_edited(made, tmp_path, format_version="1")), str(made.image)], "format_version")
    assert "newer" not in err


# ---------------------------------------------------------------- 3. --checkpoint FOLDER


def test_predict_checkpoint_folder_uses_its_one_model_or_names_the_files(made: SimpleNamespace, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(made.results / "demo"), str(made.image)]) == 0  # holds final.pt only
    assert str(made.image) in capsys.readouterr().out
    several = tmp_path / "exported"
    several.mkdir()
    for name in ("final.pt", "model.onnx"):
        (several / name).write_bytes(b"")
    _fails(capsys, ["predict", "--checkpoint", str(several), str(made.image)], "is a folder holding final.pt, model.onnx; pass one")
    _fails(capsys, ["predict", "--checkpoint", str(made.folder), str(made.image)],
           "is a folder without final.pt, model.pt2, model.onnx")  # fmt: skip


def test_predict_names_a_broken_link(made: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "photo.png"
    link.symlink_to(tmp_path / "gone.png")
    _fails(capsys, ["predict", "--checkpoint", str(made.final), str(link)], "is a broken symbolic link (to")


# ---------------------------------------------------------------- 4. export into a folder that cannot be written


@pytest.fixture
def nothing_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test once export starts on the model (building it, loading test images, exporting)."""

    def refuse(*_: Any) -> None:
        raise AssertionError("export went on although --out cannot be written")

    monkeypatch.setattr(export_command, "deployed", refuse)


def test_export_under_a_regular_file_is_one_line_before_any_work(
    made: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_exported: None
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = ["export", "--study", "demo", "--results", str(made.results), "--out"]
    _fails(capsys, [*argv, str(afile / "out")], "is not a folder, so nothing can be made under it")
    _fails(capsys, [*argv, str(afile)], "is a file; pass a folder")
    assert afile.read_text() == "not a folder"


def test_export_into_a_read_only_folder_is_one_line_before_any_work(
    made: SimpleNamespace, read_only_dir: Path, capsys: pytest.CaptureFixture[str], nothing_exported: None
) -> None:
    argv = ["export", "--study", "demo", "--results", str(made.results), "--out"]
    for out in (read_only_dir, read_only_dir / "new" / "folder"):
        _fails(capsys, [*argv, str(out)], f"cannot write in {read_only_dir} (Read-only file system)")
    assert not list(read_only_dir.iterdir())


# ---------------------------------------------------------------- 5. links and special files in --data


def _broken_link(root: Path) -> Path:
    link = root / "train" / "cat" / "dangling.png"
    link.symlink_to("nowhere.png")
    return link


def _looping_link(root: Path) -> Path:
    link = root / "train" / "cat" / "loop.png"
    link.symlink_to("loop.png")
    return link


def _folder_loop(root: Path) -> Path:
    link = root / "train" / "cat" / "up"
    link.symlink_to("..")
    return link


@pytest.mark.parametrize(
    "make, fragment",
    [(_broken_link, "a broken symbolic link (to 'nowhere.png'"), (_looping_link, "a symbolic link loop"),
     (_folder_loop, "is a link to a folder above it (a loop)")],
)  # fmt: skip
def test_a_bad_link_in_an_image_folder_is_one_line_naming_it(image_folder: Path, tmp_path: Path, make: Any, fragment: str) -> None:
    link = make(image_folder)
    with pytest.raises(UserError) as e:
        data.load_dataset(str(image_folder), cache_dir=tmp_path / "cache", progress=False)
    assert str(link) in str(e.value) and fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_a_fifo_in_an_image_folder_is_refused_not_read(image_folder: Path) -> None:
    fifo = image_folder / "train" / "cat" / "pipe.png"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(UserError, match="is not a regular file"):
        sources._listing(image_folder)


def test_links_to_files_and_folders_elsewhere_are_followed(image_folder: Path, tmp_path: Path) -> None:
    extra = make_image_folder(tmp_path / "elsewhere", classes=("cat",), n_train=2, n_test=1, seed=5)
    (image_folder / "train" / "cat" / "more").symlink_to(extra / "train" / "cat")
    (image_folder / "train" / "cat" / "one.png").symlink_to(extra / "test" / "cat" / "0000.png")
    ds = data.load_dataset(str(image_folder), cache_dir=tmp_path / "cache", progress=False)
    assert len(ds.train_y) == 3 * 20 + 3


# ---------------------------------------------------------------- 6. a cache folder that cannot be written


def _decoded_without_cache(folder: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path | None) -> None:
    capsys.readouterr()
    ds = data.load_dataset(str(folder), cache_dir=cache_dir, progress=False)
    err = capsys.readouterr().err
    assert len(ds.train_y) == 60 and ds.train_x.shape[1:] == (32, 32, 3)
    assert "decoded images not cached" in err and len(err.strip().splitlines()) == 1, err


def test_a_cache_folder_under_a_regular_file_decodes_and_says_so(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _decoded_without_cache(image_folder, capsys, afile / "cache")
    _decoded_without_cache(image_folder, capsys, afile)
    monkeypatch.setenv("CIFAR_HPO_CACHE", str(afile))
    _decoded_without_cache(image_folder, capsys, None)
    assert afile.read_text() == "not a folder"


def test_a_read_only_cache_folder_decodes_and_says_so(image_folder: Path, read_only_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _decoded_without_cache(image_folder, capsys, read_only_dir)
    _decoded_without_cache(image_folder, capsys, read_only_dir / "sub")
    assert not list(read_only_dir.iterdir())


# ---------------------------------------------------------------- 7. 16-bit images


def _gradient_16_bit(path: Path) -> Path:
    """GRADIENT as 16-bit grey (k -> k * 257, so 255 -> 65535) in ``path``'s format."""
    from PIL import Image

    wide = GRADIENT.astype(np.uint16) * 257
    if path.suffix == ".pgm":  # PIL opens a 16-bit PGM as mode "I"
        path.write_bytes(b"P5\n32 32\n65535\n" + wide.astype(">u2").tobytes())
    elif path.suffix == ".tif":
        Image.frombytes("I;16B", (32, 32), wide.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(wide).save(path)  # mode "I;16"
    return path


@pytest.mark.parametrize("name", ["g.png", "g.tif", "g.pgm"])
def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path: Path, name: str) -> None:
    from PIL import Image

    path = _gradient_16_bit(tmp_path / name)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I")
    got = decode.decode_image(name, path.read_bytes())
    assert got.dtype == np.uint8 and all(np.array_equal(got[..., c], GRADIENT) for c in range(3))
    assert np.array_equal(predict.read_image(path, (32, 32)), np.stack([GRADIENT] * 3))


def test_16_bit_values_round_to_the_nearest_8_bit_value(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "row.png"
    Image.fromarray(np.array([[0, 128, 129, 385, 65406, 65535]], dtype=np.uint16)).save(path)
    assert predict.read_image(path, (1, 6))[0].tolist() == [[0, 0, 1, 1, 254, 255]]  # its own size: not resized


# ---------------------------------------------------------------- 8. --subset range


def _dataset(n: int) -> data.Dataset:
    return data.Dataset(np.zeros((n, 32, 32, 3), np.uint8), np.arange(n) % 3, np.zeros((3, 32, 32, 3), np.uint8),
                        np.arange(3), ("a", "b", "c"), "synthetic", "k")  # fmt: skip


def test_the_subset_error_gives_the_real_valid_range() -> None:
    with pytest.raises(UserError, match=r"pass 20\.\.300$"):
        data.split_dataset(_dataset(300), subset=99_999_999)
    with pytest.raises(UserError, match=r"pass 20\.\.300$"):
        data.split_dataset(_dataset(300), subset=5)
    with pytest.raises(UserError, match="only 15 training images, a subset needs 20"):
        data.split_dataset(_dataset(15), subset=10)
    assert len(data.split_dataset(_dataset(300), subset=20).train_idx) == 18


def test_the_subset_error_on_the_command_line(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["train", "--model", "mlp", "--data", str(image_folder), "--subset", "99999999", "--cache-dir",
                    str(tmp_path / "cache"), "--device", "cpu"], "the data has 60 training images; pass 20..60")  # fmt: skip


# ---------------------------------------------------------------- 9. the mysql driver hint


@pytest.mark.parametrize(
    "url, module, fragment",
    [("mysql://u@127.0.0.1/db", "MySQLdb", "default driver, mysqldb, not the pymysql that cifar-hpo[mysql] installs: use mysql+pymysql://"),
     ("mysql+pymysql://u@127.0.0.1/db", "pymysql", "is not installed; pip install 'cifar-hpo[mysql]'"),
     ("mariadb://u@127.0.0.1/db", "MySQLdb", "use mariadb+pymysql://... instead, with pip install 'cifar-hpo[mysql]'")],
)  # fmt: skip
def test_a_missing_mysql_driver_names_the_url_and_extra_that_work(url: str, module: str, fragment: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here, so {url} finds its driver")
    with pytest.raises(UserError) as e:
        database.open_storage(url)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- archives


def test_an_archive_bomb_is_refused_before_its_members_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in ("root/train/cat/a.png", "root/test/cat/a.png"):
            info = tarfile.TarInfo(name)
            info.size = 5000
            tf.addfile(info, io.BytesIO(bytes(5000)))  # zeros: compresses ~100-fold
    monkeypatch.setattr(decode, "MAX_ARCHIVE_BYTES", 4000, raising=False)

    def refuse(*_: Any) -> None:
        raise AssertionError("a member was read although the archive is over the bound")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", refuse)
    with pytest.raises(UserError, match="holds more than .* GiB of files .* unpack it and pass the folder"):
        data.load_dataset(str(path), cache_dir=tmp_path / "cache", progress=False)
