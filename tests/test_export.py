"""`cifar-hpo export` and `cifar-hpo predict`: ONNX checked in ONNX Runtime, the three formats agree, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHARED_ARCHIVE, make_image_folder, study_toml

from cifar_hpo import cli, models
from cifar_hpo.deploy import export, predict
from cifar_hpo.models import final as finalmodel
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A final.pt of the baseline defaults (2 seeds, 1 epoch) on a 3-class synthetic folder, and its export."""
    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "imgs", n_train=20, n_test=6)
    (root / "demo.toml").write_text(study_toml(epochs=1, trials=1))
    results, cache = root / "res", root / "cache"
    code = cli.main(["retrain", "--study", str(root / "demo.toml"), "--default-params", "--data", str(folder), "--seeds", "2",
                     "--storage", f"sqlite:///{root}/absent.db", "--results", str(results), "--cache-dir", str(cache),
                     "--device", "cpu"])  # fmt: skip
    assert code == 0
    out = root / "exported"
    assert cli.main(["export", "--study", "demo", "--results", str(results), "--out", str(out), "--cache-dir", str(cache)]) == 0
    return SimpleNamespace(root=root, folder=folder, results=results, cache=cache, final=results / "demo" / "final.pt", out=out)


# The consumer side: only torch / onnxruntime, and cifar_hpo made unimportable even though it is installed.
CONSUMER = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cifar_hpo", "search_spaces"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort, torch
x = torch.load("images.pt", weights_only=True)
pt2 = torch.export.load("model.pt2").module()
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
onnx_probs = session.run(None, {"images": x.numpy().astype(np.float32) / 255})[0]
print(json.dumps({"pt2": pt2(x.float() / 255).tolist(), "onnx": onnx_probs.tolist(), "classes": json.load(open("classes.json")),
                  "onnx_classes": json.loads(session.get_modelmeta().custom_metadata_map["classes"]),
                  "onnx_input": [session.get_inputs()[0].name, *session.get_inputs()[0].shape],
                  "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("cifar_hpo", "search_spaces"))}))
"""


def test_export_runs_without_the_project(env: SimpleNamespace) -> None:
    out = env.out
    for name in ("model.onnx", "model.pt2", "final.pt", "classes.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    assert not (out / "model.ts").exists()  # TorchScript only with --torchscript (deprecated)
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.data"))  # one self-contained ONNX file, no leftovers
    f = finalmodel.load_final(env.final)
    copy = torch.load(out / "final.pt", weights_only=True)
    assert copy["test_acc"] == f["test_acc"] and copy["classes"] == f["classes"]

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen)  # another batch size than exported
    torch.save(x, out / "images.pt")
    run = subprocess.run([sys.executable, "-I", "-c", CONSUMER], cwd=out, capture_output=True, text=True, timeout=300)
    (out / "images.pt").unlink()
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["imported"] == []
    assert got["classes"] == got["onnx_classes"] == ["cat", "dog", "frog"]
    assert got["onnx_input"] == ["images", "batch", 3, 32, 32]
    with torch.no_grad():
        want = finalmodel.deployed(f)(x)
    for key in ("pt2", "onnx"):
        torch.testing.assert_close(torch.tensor(got[key]), want, atol=1e-5, rtol=1e-4)
    assert torch.tensor(got["onnx"]).sum(1).sub(1).abs().max() < 1e-5  # probabilities

    card = (out / "MODEL_CARD.md").read_text()
    mean, std = 100 * np.mean(f["test_acc"]), 100 * np.std(f["test_acc"], ddof=1)
    assert f"{mean:.2f} ± {std:.2f} %" in card
    for text in ("cat, dog, frog", 'ort.InferenceSession("model.onnx")', f["hardware"], "default parameters of the `baseline` search space",
                 "18 of the 18 test images", "| `model.onnx` | 18 |", "| 18 / 18 (100.00 %) |"):
        assert text in card, text
    assert "torch.jit" not in card


def test_torchscript_only_on_request(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ts"
    argv = ["export", "--study", "demo", "--results", str(env.results), "--out", str(out), "--cache-dir", str(env.cache)]
    assert cli.main([*argv, "--torchscript"]) == 0
    assert "model.ts" in capsys.readouterr().out
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), pytest.warns(FutureWarning):  # torch.jit.load's deprecation, which the card states
        got = torch.jit.load(str(out / "model.ts"))(x)
        torch.testing.assert_close(got, finalmodel.deployed(finalmodel.load_final(env.final))(x), atol=1e-5, rtol=1e-4)
    card = (out / "MODEL_CARD.md").read_text()
    assert "deprecated since PyTorch 2.11" in card and "| `model.ts` | 18 |" in card
    helptext = [a.help for a in cli.build_parser()._subparsers._group_actions[0].choices["export"]._actions  # type: ignore[union-attr]
                if "--torchscript" in a.option_strings][0]
    assert "deprecated" in helptext


@pytest.mark.parametrize(
    "name", [*(n for n in models.MODELS if n not in ("resnet18", "densenet121")),
             *(pytest.param(n, marks=pytest.mark.slow) for n in ("resnet18", "densenet121"))],
)  # fmt: skip
def test_every_model_exports_to_onnx_and_pt2(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    params = models.default_params(name).replace(pretrained=False)
    module = finalmodel.Deployed(models.build(params, 10), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()
    example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    classes = [f"c{i}" for i in range(10)]
    export.export_onnx(module, example, tmp_path / "m.onnx", classes)
    export.export_program(module, example, tmp_path / "m.pt2", classes)
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # another batch size than exported
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    for path in (tmp_path / "m.onnx", tmp_path / "m.pt2"):
        loaded = predict.load(path)
        assert loaded.classes == classes and loaded.input_size == (3, 32, 32)
        check = export.check_loaded(path, want, x)
        assert check.ok and check.agree == 3 and check.max_diff < 1e-5, (path.name, check)
    assert predict.load(tmp_path / "m.onnx").source == "onnxruntime"


def test_compare_counts_real_disagreements_only() -> None:
    want = np.array([[0.7, 0.2, 0.1], [0.5, 0.5 - 1e-6, 1e-6], [0.1, 0.3, 0.6]])
    got = np.array([[0.7, 0.2, 0.1], [0.5 - 2e-6, 0.5 + 1e-6, 1e-6], [0.6, 0.3, 0.1]])
    c = export.compare(got, want)
    assert (c.images, c.agree, c.real_disagreements) == (3, 1, 1)  # row 2 is a near-tie, row 3 a real disagreement
    assert c.max_diff == pytest.approx(0.5) and not c.ok
    assert export.compare(want, want).ok


def test_an_export_that_does_not_match_is_not_written(env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(export, "EXPORT_TOLERANCE", -1.0)  # every reloaded program "differs"
    out = tmp_path / "bad"
    capsys.readouterr()
    assert cli.main(["export", "--study", "demo", "--results", str(env.results), "--out", str(out), "--cache-dir", str(env.cache)]) == 2
    err = capsys.readouterr().err
    assert "no format could export baseline_cnn" in err and "model.onnx" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == []


def test_export_without_onnx_names_the_extra(env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: find_spec None, import fails
    out = tmp_path / "noonnx"
    assert cli.main(["export", "--study", "demo", "--results", str(env.results), "--out", str(out), "--cache-dir", str(env.cache)]) == 0
    printed = capsys.readouterr().out
    assert "note: model.onnx not written (model.onnx: onnxscript not installed: pip install 'cifar-hpo[onnx]')" in printed
    assert (out / "model.pt2").is_file() and not (out / "model.onnx").exists()


def test_predict_gives_the_same_classes_from_all_three_formats(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    results = {}
    for name in ("final.pt", "model.pt2", "model.onnx"):
        capsys.readouterr()
        assert cli.main(["predict", "--checkpoint", str(env.out / name), str(env.folder / "test"), "--json", "--top", "3"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    ref = results["final.pt"]
    assert len(ref) == 18
    for name in ("model.pt2", "model.onnx"):
        assert [r["class"] for r in results[name]] == [r["class"] for r in ref], name
        assert [[t["class"] for t in r["top"]] for r in results[name]] == [[t["class"] for t in r["top"]] for r in ref], name
        assert np.allclose([r["probability"] for r in results[name]], [r["probability"] for r in ref], atol=1e-5)


# Predict from model.onnx in a process where importing torch fails.
NO_TORCH = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return None
BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Block())
from cifar_hpo import cli
code = cli.main(sys.argv[2:])
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
sys.exit(code)
"""


def _blocked(blocked: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", NO_TORCH, blocked, *argv], capture_output=True, text=True, timeout=300, env=env)


def test_onnx_predict_needs_no_torch(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    run = _blocked("torch,torchvision,optuna", "predict", "--checkpoint", str(env.out / "model.onnx"), str(env.folder / "test"), "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(env.final), str(env.folder / "test"), "--json"]) == 0
    assert [r["class"] for r in got] == [r["class"] for r in json.loads(capsys.readouterr().out)]
    # The same process without torch, on a final.pt: torch is needed there, and the import is what fails.
    run = _blocked("torch", "predict", "--checkpoint", str(env.final), str(env.folder / "test"))
    assert run.returncode != 0 and "blocked: torch" in run.stderr


def test_onnx_predict_without_onnxruntime_is_one_line(env: SimpleNamespace) -> None:
    run = _blocked("onnxruntime", "predict", "--checkpoint", str(env.out / "model.onnx"), str(env.folder / "test"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "cifar-hpo: error: running model.onnx needs ONNX Runtime, which is not installed: pip install 'cifar-hpo[onnx]'"
    ], run.stderr


@pytest.mark.slow
def test_export_checked_on_the_real_test_images(tmp_path: Path) -> None:
    """A model trained briefly on the shared archive: ONNX and pt2 agree with PyTorch on 1,000 real test images."""
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"{SHARED_ARCHIVE} not present")
    (tmp_path / "real.toml").write_text(study_toml(name="real", epochs=1, trials=1))
    results = tmp_path / "res"
    assert cli.main(["retrain", "--study", str(tmp_path / "real.toml"), "--default-params", "--data", str(SHARED_ARCHIVE),
                     "--subset", "2000", "--storage", f"sqlite:///{tmp_path}/absent.db", "--results", str(results),
                     "--device", "cpu"]) == 0  # fmt: skip
    out = tmp_path / "exported"
    assert cli.main(["export", "--study", "real", "--results", str(results), "--out", str(out)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "1,000 of the 5,000 test images" in card or "1,000 of the 10,000 test images" in card, card
    for name in ("model.onnx", "model.pt2"):
        assert f"| `{name}` | 1,000 |" in card and "| 1,000 / 1,000 (100.00 %) |" in card


def test_predict_matches_the_checkpoint_model(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_hpo import data

    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(env.final), str(env.folder / "test"), "--json", "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18
    assert all(len(r["top"]) == 2 and r["top"][0]["class"] == r["class"] for r in rows)
    assert all(r["top"][0]["probability"] >= r["top"][1]["probability"] for r in rows)
    # The same images through the loaded model give the same classes (folders sorted = data order).
    f = finalmodel.load_final(env.final)
    ds = data.load_dataset(str(env.folder), cache_dir=env.root / "cache", progress=False)
    x = torch.from_numpy(ds.test_x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want = finalmodel.deployed(f)(x).argmax(1).tolist()
    assert [r["class"] for r in rows] == [f["classes"][i] for i in want]
    assert [Path(r["path"]).parent.name for r in rows] == [f["classes"][i] for i in ds.test_y]


def test_predict_any_size_and_nested_folders(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    nested = tmp_path / "photos" / "deeper"
    nested.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(nested / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (100, 100), dtype=np.uint8)).save(tmp_path / "photos" / "gray.png")  # 1 channel
    (tmp_path / "photos" / "notes.txt").write_text("not an image, skipped in folders")
    single = tmp_path / "one.bmp"
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(single)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(env.final), str(tmp_path / "photos"), str(single), "--top", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(str(nested / "wide.jpg")) or lines[0].startswith(str(tmp_path / "photos" / "deeper"))
    assert all("%" in line and "(" in line for line in lines)  # top classes shown (clamped to 3 classes)
    assert lines[-1].startswith(str(single))


def test_read_image_resizes_bilinear(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    got = predict.read_image(tmp_path / "a.png", (32, 32))
    want = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_bad_input(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(argv: list[str], message: str) -> None:
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1

    bad = tmp_path / "bad.png"
    bad.write_text("this is not a PNG")
    fails(
        ["predict", "--checkpoint", str(env.final), str(env.folder / "test" / "cat" / "0000.png"), str(bad)],
        f"{bad} is not a readable image",
    )
    fails(["predict", "--checkpoint", str(env.final), str(tmp_path / "nothing.jpg")], "nothing.jpg does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["predict", "--checkpoint", str(env.final), str(empty)], "holds no image files")
    fails(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(bad)], "missing.pt does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(env.final.read_bytes()[:1000])
    fails(["predict", "--checkpoint", str(corrupt), str(bad)], "cannot be loaded safely")
    other = tmp_path / "other.pt"
    checkpoint.save({"model": {}}, other)
    fails(["predict", "--checkpoint", str(other), str(bad)], "is not a final checkpoint")
    fails(["predict", "--checkpoint", str(env.final), str(bad), "--top", "0"], "--top must be >= 1")
    fails(["export", "--study", "nope", "--results", str(env.results), "--out", str(tmp_path / "o")],
          "study 'nope' has no final model")  # fmt: skip
    assert not (tmp_path / "o").exists()
    # Weights that do not fit the model the checkpoint names.
    f = finalmodel.load_final(env.final)
    mismatched = tmp_path / "mismatch.pt"
    checkpoint.save({**f, "params": TrialParams(model="mlp").to_dict()}, mismatched)
    fails(["predict", "--checkpoint", str(mismatched), str(env.folder / "test")], "do not fit model 'mlp'")


def test_export_needs_the_models_test_images(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = finalmodel.load_final(env.final)
    results = tmp_path / "res"
    checkpoint.save({**f, "data": {**f["data"], "source": str(tmp_path / "moved-away")}}, results / "demo" / "final.pt")
    out = tmp_path / "out"
    argv = ["export", "--study", "demo", "--results", str(results), "--out", str(out), "--cache-dir", str(env.cache)]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "moved-away" in err and "pass --data" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing half-written
    assert cli.main([*argv, "--data", str(env.folder)]) == 0  # the images found where they are now
    assert "18 of the 18 test images" in (out / "MODEL_CARD.md").read_text()
