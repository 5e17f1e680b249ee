"""Model registry: shapes, gradients, declared capabilities, pretrained loading from the hub cache, fine-tune freezing."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo import models
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.training import loop
from tests.test_train import colour_data

CASES = [(name, {}) for name in models.MODELS] + [
    ("resnet18", {"upsample": 64}),
    ("resnet18", {"cifar_stem": True}),
    ("densenet121", {"cifar_stem": True}),
    ("fast_cnn", {"width": 0.25, "act": "relu"}),
    ("mlp", {"hidden": 32, "depth": 3}),
]


@pytest.mark.parametrize(("name", "arch"), CASES, ids=[f"{n}-{a}" if a else n for n, a in CASES])
def test_forward_backward(name: str, arch: dict) -> None:
    torch.manual_seed(0)
    model = models.build(TrialParams(model=name, arch=arch, dropout=0.1), num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_baseline_cnn_is_the_original() -> None:
    model = models.build(TrialParams(model="baseline_cnn"), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 6, (5, 5)), (6, 16, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(400, 120), (120, 84), (84, 10)]
    assert not any(isinstance(m, nn.Softmax | nn.LogSoftmax) for m in model.modules())
    assert models.count_params(model) == 62006


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UserError, match="valid models: baseline_cnn, mlp, resnet18, densenet121, fast_cnn"):
        models.build(TrialParams(model="vgg99"), 10)
    with pytest.raises(UserError, match="unknown model"):
        models.default_params("vgg99")


@pytest.mark.parametrize("name", list(models.MODELS))
def test_registry_entry_is_complete_and_consistent(name: str) -> None:
    """Walk one registry entry: every recipe builds, runs and is its own; stages cover the network."""
    entry = models.MODELS[name]
    assert set(entry.recipes) == set(models.DEVICE_KINDS)
    for kind, recipe in entry.recipes.items():
        assert recipe.model == name, f"{name} {kind} recipe belongs to {recipe.model}"
        assert set(recipe.arch) <= entry.arch_keys
        assert models.default_params(name, kind) == recipe
        torch.manual_seed(0)
        net = models.build(recipe, 10)
        for mode in (True, False):
            out = net.train(mode)(torch.randn(2, 3, 32, 32))
            assert out.shape == (2, 10) and torch.isfinite(out).all()
    if not entry.stages:
        return
    # Fine-tune depth d trains the first d stages: each stage holds parameters of its own,
    # the last one is the stem, and depth len(stages) trains every backbone parameter.
    net = models.build(entry.recipes["cpu"].replace(arch={}), 10).net  # type: ignore[union-attr]
    head = [h for h in ("fc", "classifier") if hasattr(net, h)]
    trained = []
    for depth in range(len(entry.stages) + 1):
        models.pretrained._freeze(net, entry.stages, depth, head)
        trained.append(sum(p.numel() for p in net.parameters() if p.requires_grad))
    assert all(a < b for a, b in zip(trained, trained[1:], strict=False)), trained
    assert trained[-1] == sum(p.numel() for p in net.parameters())
    assert any("conv" in part for part in entry.stages[-1])


# Small enough to train two epochs on a CPU in seconds; any other model trains its cpu recipe's arch.
_SMALL_ARCH = {"fast_cnn": {"width": 0.125}, "mlp": {"hidden": 32}, "resnet18": {"cifar_stem": False},
               "densenet121": {"cifar_stem": False}}  # fmt: skip


@pytest.mark.parametrize("name", list(models.MODELS))
def test_declared_capabilities_are_what_the_module_offers_and_train_uses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walk one registry entry: what training asks of the model (`Capabilities`) is declared, true and honoured."""
    caps = models.MODELS[name].capabilities
    recipe = models.default_params(name, "cpu")
    params = recipe.replace(pretrained=False, batch_size=16, arch={**recipe.arch, **_SMALL_ARCH.get(name, {})})
    torch.manual_seed(0)
    net = models.build(params, 3)
    # Declared <=> offered by the built module.
    assert caps.init_from_data == callable(getattr(net, "init_from_data", None))
    assert caps.tta == hasattr(net, "tta")
    own_level = getattr(net, "tta", None)
    if caps.tta:
        assert 0 in caps.tta_levels and own_level in caps.tta_levels  # train() switches to 0 before the last epoch
        net.eval()
        for level in caps.tta_levels:
            net.tta = level
            with torch.no_grad():
                out = net(torch.randn(2, 3, 32, 32))
            assert out.shape == (2, 3) and torch.isfinite(out).all()
        net.tta = own_level
    # Honoured by train(): init_from_data once on a fresh run (never on resume), one pass before the last epoch.
    inits: list[tuple[int, ...]] = []
    if caps.init_from_data:
        real_init = net.init_from_data
        monkeypatch.setattr(net, "init_from_data", lambda x: (inits.append(tuple(x.shape)), real_init(x))[1])
    levels: list[object] = []
    real_evaluate = loop.evaluate

    def spy(model: nn.Module, *args: object, **kwargs: object) -> object:
        levels.append(getattr(model, "tta", None))
        return real_evaluate(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "evaluate", spy)
    data = colour_data(n_train=32, n_eval=8)
    snapshots: list[dict] = []
    history = loop.train(net, data, params, epochs=2, seed=0, on_epoch=lambda r, snap: snapshots.append(snap()))
    assert history.status == "ok" and len(history.epochs) == 2
    assert inits == ([(32, 3, 32, 32)] if caps.init_from_data else [])
    assert levels == ([0, own_level] if caps.tta else [None, None])
    assert getattr(net, "tta", None) == own_level  # restored, and never added to a model without it
    loop.train(net, data, params, epochs=2, seed=0, resume=snapshots[-1])  # nothing left to train, nothing to initialise
    assert len(inits) == (1 if caps.init_from_data else 0)


def test_default_recipe_follows_the_device_kind() -> None:
    assert models.default_params("fast_cnn", torch.device("cpu")) == models.MODELS["fast_cnn"].recipes["cpu"]
    assert models.default_params("fast_cnn", "cuda") == models.MODELS["fast_cnn"].recipes["gpu"]
    assert models.default_params("fast_cnn") == models.MODELS["fast_cnn"].recipes["cpu"]
    assert models.default_params("fast_cnn", "gpu").arch["width"] == 1.0
    with pytest.raises(UserError, match="valid models: baseline_cnn, mlp, resnet18, densenet121, fast_cnn"):
        models.get("vgg99")


def test_fast_cnn_width_and_whitening() -> None:
    small = models.build(TrialParams(model="fast_cnn", arch={"width": 0.25}), 10)
    full = models.build(TrialParams(model="fast_cnn"), 10)
    assert 1_500_000 < models.count_params(full) < 2_500_000  # the ~2M-parameter airbench size
    assert models.count_params(small) < models.count_params(full) / 8
    assert isinstance(small, models.FastCNN)
    # After data init, the first layer maps 2x2 patches to decorrelated unit-variance features.
    torch.manual_seed(0)
    x = torch.randn(256, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x = x + 0.8 * x.roll(1, dims=1) + 0.3  # correlated channels, off-centre
    small.init_from_data(x)
    assert not small.whiten.weight.requires_grad
    feats = F.conv2d(x, small.whiten.weight[:12], small.whiten.bias[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert torch.allclose(feats.mean(0), torch.zeros(12, dtype=torch.float64), atol=0.02)
    assert torch.allclose(torch.cov(feats.T), torch.eye(12, dtype=torch.float64), atol=0.05)


def test_fast_cnn_tta_is_flip_invariant_in_eval() -> None:
    model = models.build(TrialParams(model="fast_cnn", arch={"width": 0.25}), 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.flip(-1)), atol=1e-5)


# ---------------------------------------------------------------- pretrained weights

TORCHVISION = {"resnet18": ("resnet18", "ResNet18_Weights"), "densenet121": ("densenet121", "DenseNet121_Weights")}


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every hub download raise, as on a machine without internet; return the URLs tried."""
    tried: list[str] = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        tried.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried


def _plant(name: str, torch_home: Path) -> dict[str, torch.Tensor]:
    """Save a randomly initialised torchvision model where torch hub looks for its ImageNet weights."""
    import torchvision.models as tvm

    builder, enum = TORCHVISION[name]
    weights = getattr(tvm, enum).IMAGENET1K_V1
    torch.manual_seed(123)
    state = getattr(tvm, builder)(weights=None).state_dict()
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    assert models.weights_path(weights) == path
    return state


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_pretrained_loads_planted_file_without_network(name: str, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _plant(name, torch_home)
    tried = _forbid_downloads(monkeypatch)
    model = models.build(TrialParams(model=name, pretrained=True, finetune_depth=1), 10)
    assert tried == []
    loaded = model.state_dict()
    key = "layer1.0.conv1.weight" if name == "resnet18" else "features.denseblock1.denselayer1.conv1.weight"
    assert torch.equal(loaded[f"net.{key}"], state[key])
    bn = "bn1.running_var" if name == "resnet18" else "features.norm5.running_var"
    assert torch.equal(loaded[f"net.{bn}"], state[bn])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_missing_weights_is_one_user_error_naming_the_path(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = _forbid_downloads(monkeypatch)
    with pytest.raises(UserError) as info:
        models.build(TrialParams(model="resnet18", pretrained=True), 10)
    message = str(info.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message
    assert "resnet18-f37072fd.pth" in message and "pretrained=false" in message
    assert "\n" not in message
    assert len(tried) == 1  # one download attempt, then the error


# Parameter-name prefixes (under `net.`) that train at each fine-tune depth.
RESNET_TRAINS = ["fc", "layer4", "layer3", "layer2", "layer1", "conv1|bn1"]
DENSENET_TRAINS = [
    "classifier",
    "features.denseblock4|features.norm5",
    "features.denseblock3|features.transition3",
    "features.denseblock2|features.transition2",
    "features.denseblock1|features.transition1",
    "features.conv0|features.norm0",
]


def _expected_trainable(names: list[str], table: list[str], depth: int) -> set[str]:
    prefixes = [p for entry in table[: depth + 1] for p in entry.split("|")]
    return {n for n in names if any(n.removeprefix("net.").startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4, 5, 9])
def test_resnet_finetune_depth_sets_requires_grad(depth: int, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant("resnet18", torch_home)
    _forbid_downloads(monkeypatch)
    model = models.build(TrialParams(model="resnet18", pretrained=True, finetune_depth=depth), 10)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(names, RESNET_TRAINS, depth)
    if depth >= 5:
        assert trainable == set(names)


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_densenet_finetune_depth_sets_requires_grad(depth: int, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant("densenet121", torch_home)
    _forbid_downloads(monkeypatch)
    model = models.build(TrialParams(model="densenet121", pretrained=True, finetune_depth=depth), 10)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(names, DENSENET_TRAINS, depth)


def test_cifar_stem_trains_with_a_frozen_backbone(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant("resnet18", torch_home)
    _forbid_downloads(monkeypatch)
    model = models.build(TrialParams(model="resnet18", pretrained=True, arch={"cifar_stem": True}), 10)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"conv1", "bn1", "fc"}


def test_finetune_depth_ignored_without_pretrained() -> None:
    model = models.build(TrialParams(model="resnet18", pretrained=False, finetune_depth=0), 10)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_statistics_do_not_move(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant("resnet18", torch_home)
    _forbid_downloads(monkeypatch)
    model = models.build(TrialParams(model="resnet18", pretrained=True, finetune_depth=1), 10)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()  # must not wake the frozen BatchNorm layers
    assert not model.net.bn1.training and not model.net.layer3[1].bn2.training
    assert model.net.layer4[0].bn1.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32) * 3 + 1), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        assert moved == k.startswith("net.layer4."), k


def test_unknown_arch_option_is_refused() -> None:
    from cifar_hpo.errors import UserError
    from cifar_hpo.models import build
    from cifar_hpo.params import TrialParams

    with pytest.raises(UserError, match="unknown arch option.*width; valid: depth, hidden, image_size"):
        build(TrialParams(model="mlp", arch={"width": 512}), 10)


def test_fast_cnn_tta_levels_and_identity_init() -> None:
    torch.manual_seed(0)
    model = models.build(TrialParams(model="fast_cnn", arch={"width": 0.25, "tta": 2}), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mirror = 0.5 * (model._logits(x) + model._logits(x.flip(-1)))
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        ups = [padded[..., :32, :32], padded[..., 2:, 2:]]
        shifted = sum(0.5 * (model._logits(u) + model._logits(u.flip(-1))) for u in ups) / 2
        assert torch.allclose(model(x), 0.5 * mirror + 0.5 * shifted, atol=1e-5)
        model.tta = 0
        assert torch.equal(model(x), model._logits(x))
    for bad in (3, "yes", 1.5):
        with pytest.raises(UserError, match="arch.tta must be 0, 1 or 2"):
            models.build(TrialParams(model="fast_cnn", arch={"tta": bad}), 10)
    # The first c_in filters of every conv start as the identity; identity_init=false keeps torch's init.
    conv = model.groups[1][0]  # 16 -> 64 channels at width 0.25
    assert torch.equal(conv.weight[:16, :, 1, 1], torch.eye(16)) and conv.weight[:16].abs().sum() == 16
    plain = models.build(TrialParams(model="fast_cnn", arch={"width": 0.25, "identity_init": False}), 10)
    assert not torch.equal(plain.groups[1][0].weight[:16, :, 1, 1], torch.eye(16))
