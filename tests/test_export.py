"""`cifar-hpo export` and `cifar-hpo predict`: standalone programs, model card, predictions, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image_folder, study_toml

from cifar_hpo import checkpoint, cli, export, final, models
from cifar_hpo.params import TrialParams

# torch.jit is deprecated in favour of torch.export; this project writes and checks both.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A final.pt of the baseline defaults (2 seeds, 1 epoch) on a 3-class synthetic folder."""
    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "imgs", n_train=20, n_test=6)
    (root / "demo.toml").write_text(study_toml(epochs=1, trials=1))
    results = root / "res"
    code = cli.main(["retrain", "--study", str(root / "demo.toml"), "--default-params", "--data", str(folder), "--seeds", "2",
                     "--storage", f"sqlite:///{root}/absent.db", "--results", str(results), "--cache-dir", str(root / "cache"),
                     "--device", "cpu"])  # fmt: skip
    assert code == 0
    return SimpleNamespace(root=root, folder=folder, results=results, final=results / "demo" / "final.pt")


# The consumer side: only torch, and cifar_hpo made unimportable even though it is installed.
CONSUMER = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cifar_hpo", "search_spaces"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import torch
x = torch.load("images.pt", weights_only=True)
ts = torch.jit.load("model.ts")
pt2 = torch.export.load("model.pt2").module()
p_u8, p_float, p_pt2 = ts(x), ts(x.float() / 255), pt2(x.float() / 255)
classes = json.load(open("classes.json"))
print(json.dumps({"ts": p_u8.tolist(), "ts_float": p_float.tolist(), "pt2": p_pt2.tolist(), "classes": classes,
                  "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("cifar_hpo", "search_spaces"))}))
"""


def test_export_runs_without_the_project(env: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert cli.main(["export", "--study", "demo", "--results", str(env.results), "--out", str(out)]) == 0
    for name in ("model.ts", "model.pt2", "final.pt", "classes.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    f = final.load_final(env.final)
    copy = torch.load(out / "final.pt", weights_only=True)
    assert copy["test_acc"] == f["test_acc"] and copy["classes"] == f["classes"]

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen)
    torch.save(x, out / "images.pt")
    run = subprocess.run([sys.executable, "-I", "-c", CONSUMER], cwd=out, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["imported"] == []
    assert got["classes"] == ["cat", "dog", "frog"]
    with torch.no_grad():
        want = export.deployed(f)(x)
    for key in ("ts", "ts_float", "pt2"):
        torch.testing.assert_close(torch.tensor(got[key]), want, atol=1e-5, rtol=1e-4)
    assert torch.tensor(got["ts"]).sum(1).sub(1).abs().max() < 1e-5  # probabilities

    card = (out / "MODEL_CARD.md").read_text()
    mean, std = 100 * np.mean(f["test_acc"]), 100 * np.std(f["test_acc"], ddof=1)
    assert f"{mean:.2f} ± {std:.2f} %" in card
    for text in ("cat, dog, frog", 'torch.jit.load("model.ts")', f["hardware"], "default parameters of the `baseline` search space"):
        assert text in card, text


@pytest.mark.parametrize(
    "name", [*(n for n in models.MODELS if n not in ("resnet18", "densenet121")),
             *(pytest.param(n, marks=pytest.mark.slow) for n in ("resnet18", "densenet121"))],
)  # fmt: skip
def test_every_model_exports_to_both_formats(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    params = models.default_params(name).replace(pretrained=False)
    module = export.Deployed(models.build(params, 10), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()
    example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    export.export_torchscript(module, example, tmp_path / "m.ts")
    export.export_program(module, example, tmp_path / "m.pt2")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # another batch size than traced
    with torch.no_grad():
        want = module(x)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(x), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x.float() / 255), want, atol=1e-5, rtol=1e-4)


def test_predict_matches_the_checkpoint_model(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_hpo import data

    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(env.final), str(env.folder / "test"), "--json", "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18
    assert all(len(r["top"]) == 2 and r["top"][0]["class"] == r["class"] for r in rows)
    assert all(r["top"][0]["probability"] >= r["top"][1]["probability"] for r in rows)
    # The same images through the loaded model give the same classes (folders sorted = data order).
    f = final.load_final(env.final)
    ds = data.load_dataset(str(env.folder), cache_dir=env.root / "cache", progress=False)
    x = torch.from_numpy(ds.test_x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want = export.deployed(f)(x).argmax(1).tolist()
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
    got = export.read_image(tmp_path / "a.png", (32, 32))
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
    f = final.load_final(env.final)
    mismatched = tmp_path / "mismatch.pt"
    checkpoint.save({**f, "params": TrialParams(model="mlp").to_dict()}, mismatched)
    fails(["predict", "--checkpoint", str(mismatched), str(env.folder / "test")], "do not fit model 'mlp'")
