"""Training loop: learning, non-finite stop, reproducibility, exact resume, CLI and benchmark entry points."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cifar_hpo import cli, models
from cifar_hpo.data import DeviceData
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint
from cifar_hpo.training import (
    EpochResult,
    History,
    StopTraining,
    evaluate,
    lr_factor,
    make_optimizer,
    train,
)
from cifar_hpo.training import loop as train_mod
from cifar_hpo.training import precision as precision_mod


def colour_data(n_train: int = 240, n_eval: int = 60, classes: int = 3, seed: int = 0) -> DeviceData:
    """Images whose class is their dominant colour channel, plus noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        base = torch.full((n, 3, 1, 1), 60.0)
        base[torch.arange(n), y % 3] = 150.0
        x = base + torch.randn(n, 3, 32, 32, generator=g) * 40
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = make(n_train)
    ex, ey = make(n_eval)
    mean = tuple((tx.float() / 255).mean((0, 2, 3)).tolist())
    std = tuple((tx.float() / 255).std((0, 2, 3)).tolist())
    return DeviceData(tx, ty, ex, ey, "val", tuple(f"c{i}" for i in range(classes)), mean, std, "test")  # type: ignore[arg-type]


SMALL = TrialParams(
    model="fast_cnn",
    lr=0.05,
    batch_size=32,
    optimizer="sgd",
    schedule="onecycle",
    warmup_frac=0.2,
    label_smoothing=0.1,
    aug_strength=0.5,
    aug_ops=("translate", "flip"),
    arch={"width": 0.125},
)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_timing(h: History) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(e).items() if k not in ("seconds", "images_per_s", "peak_mem_mb")} for e in h.epochs]


def _run(params: TrialParams, data: DeviceData, epochs: int, seed: int = 0, **kw: object) -> tuple[nn.Module, History]:
    torch.manual_seed(seed)
    model = models.build(params, data.num_classes)
    return model, train(model, data, params, epochs=epochs, seed=seed, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("model_name", ["fast_cnn", "baseline_cnn"])
def test_learns_separable_synthetic_data(model_name: str) -> None:
    data = colour_data()
    params = SMALL if model_name == "fast_cnn" else models.default_params("baseline_cnn").replace(batch_size=32)
    _, history = _run(params, data, epochs=4)
    assert history.status == "ok"
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert history.best_val_acc >= 0.9  # chance is 1/3
    last = history.epochs[-1]
    assert last.images_per_s > 0 and last.peak_mem_mb > 0 and last.seconds > 0
    assert math.isfinite(last.train_loss) and math.isfinite(last.val_loss)
    assert history.params_count == models.count_params(models.build(params, 3))
    d = history.to_dict()
    json.dumps(d)
    assert d["status"] == "ok" and len(d["epochs"]) == 4 and d["best_val_acc"] == history.best_val_acc


def test_bf16_on_cpu_trains() -> None:
    _, history = _run(SMALL.replace(precision="bf16"), colour_data(), epochs=3)
    assert history.status == "ok" and history.best_val_acc >= 0.9


def test_smaller_than_one_batch_still_trains() -> None:
    _, history = _run(SMALL.replace(batch_size=512), colour_data(n_train=30, n_eval=9), epochs=2)
    assert history.status == "ok" and len(history.epochs) == 2


@pytest.mark.slow
def test_real_images_beat_chance(shared_archive: Path, tmp_path: Path) -> None:
    from cifar_hpo import data

    ds = data.load_dataset(str(shared_archive), cache_dir=tmp_path / "cache", progress=False)
    split = data.split_dataset(ds, subset=2000)
    dd = data.trial_data(ds, split, torch.device("cpu"))
    params = models.default_params("fast_cnn").replace(batch_size=128, lr=0.1)
    _, history = _run(params, dd, epochs=5)
    assert history.status == "ok"
    assert history.best_val_acc > 0.30  # chance is 0.10


# ---------------------------------------------------------------- stops


class _InfAfter(nn.Module):
    """Wraps a model; its forward returns inf logits from call number ``bad`` on."""

    def __init__(self, inner: nn.Module, bad: int) -> None:
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        return out * math.inf if self.calls >= self.bad and self.training else out

    # train() asks the registry what the model offers (models.registry.Capabilities): a wrapper offers what the inner one does.
    def init_from_data(self, x: torch.Tensor) -> None:
        self.inner.init_from_data(x)  # type: ignore[operator]

    @property
    def tta(self) -> int:
        return int(self.inner.tta)  # type: ignore[arg-type]

    @tta.setter
    def tta(self, level: int) -> None:
        self.inner.tta = level  # type: ignore[assignment]


def test_nonfinite_loss_stops_at_the_first_bad_step() -> None:
    data = colour_data(n_train=96)  # 3 steps per epoch at batch 32
    torch.manual_seed(0)
    model = _InfAfter(models.build(SMALL, 3), bad=5)  # 2nd step of epoch 2
    before: dict[str, torch.Tensor] = {}
    seen: list[int] = []

    def on_epoch(r: EpochResult, snapshot: object) -> None:
        seen.append(r.epoch)
        before.update(_weights(model))

    history = train(model, data, SMALL, epochs=5, on_epoch=on_epoch)
    assert history.status == "nonfinite"
    assert seen == [1] and [e.epoch for e in history.epochs] == [1]
    assert model.calls == 5  # no training forward pass after the bad one
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_huge_learning_rate_is_nonfinite() -> None:
    params = SMALL.replace(model="mlp", lr=1e30, optimizer="sgd", schedule="constant", arch={"hidden": 16})
    _, history = _run(params, colour_data(), epochs=3)
    assert history.status == "nonfinite"
    assert len(history.epochs) < 3


def test_stop_training_from_on_epoch() -> None:
    def stop(r: EpochResult, snapshot: object) -> None:
        if r.epoch == 2:
            raise StopTraining

    _, history = _run(SMALL, colour_data(), epochs=5, on_epoch=stop)
    assert history.status == "stopped" and len(history.epochs) == 2


def test_other_exceptions_from_on_epoch_propagate() -> None:
    class Pruned(Exception):
        pass

    def prune(r: EpochResult, snapshot: object) -> None:
        raise Pruned

    with pytest.raises(Pruned):
        _run(SMALL, colour_data(), epochs=3, on_epoch=prune)


# ---------------------------------------------------------------- reproducibility and resume

# Dropout, augmentation and a schedule: every source of randomness and state.
RESUMABLE = TrialParams(
    model="mlp",
    lr=3e-3,
    batch_size=32,
    optimizer="adamw",
    weight_decay=0.01,
    schedule="cosine",
    warmup_frac=0.3,
    dropout=0.2,
    aug_strength=0.7,
    aug_ops=("translate", "flip"),
    arch={"hidden": 32, "depth": 2},
)


def test_same_seed_same_history_and_weights() -> None:
    data = colour_data()
    m1, h1 = _run(RESUMABLE, data, epochs=2, seed=3)
    m2, h2 = _run(RESUMABLE, data, epochs=2, seed=3)
    m3, h3 = _run(RESUMABLE, data, epochs=2, seed=4)
    assert _without_timing(h1) == _without_timing(h2)
    assert _same_weights(_weights(m1), _weights(m2))
    assert not _same_weights(_weights(m1), _weights(m3))


def _crash_after_epoch_1(params: TrialParams, data: Any, epochs: int, path: Path) -> Any:
    """Train with seed 1, save the snapshot of epoch 1 to ``path`` and stop there (the "crash")."""

    def keep_epoch_1(r: EpochResult, snapshot) -> None:  # type: ignore[no-untyped-def]
        if r.epoch == 1:
            checkpoint.save(snapshot(), path)
            raise StopTraining

    return _run(params, data, epochs=epochs, seed=1, on_epoch=keep_epoch_1)[1]


@pytest.mark.parametrize("params", [RESUMABLE, SMALL], ids=["mlp-adamw-dropout", "fast_cnn-sgd-bn"])
def test_resume_from_snapshot_equals_uninterrupted(params: TrialParams, tmp_path: Path) -> None:
    data = colour_data()
    full_model, full = _run(params, data, epochs=3, seed=1)

    path = tmp_path / "snap.pt"
    assert _crash_after_epoch_1(params, data, 3, path).status == "stopped"

    torch.manual_seed(99)  # a fresh model with other weights: resume must overwrite them
    resumed_model = models.build(params, data.num_classes)
    resumed = train(resumed_model, data, params, epochs=3, seed=1, resume=checkpoint.load(path))
    assert resumed.status == "ok"
    assert _without_timing(resumed) == _without_timing(full)
    assert _same_weights(_weights(resumed_model), _weights(full_model))


def test_snapshot_keeps_weights_under_model_state_and_an_old_model_key_still_resumes(tmp_path: Path) -> None:
    data = colour_data()
    full_model, full = _run(RESUMABLE, data, epochs=2, seed=1)
    path = tmp_path / "snap.pt"
    _crash_after_epoch_1(RESUMABLE, data, 2, path)
    snap = checkpoint.load(path)
    assert "model_state" in snap and "model" not in snap  # one layout: final.pt and trial checkpoints use the same key
    snap["model"] = snap.pop("model_state")  # a snapshot written before the key was renamed
    resumed_model = models.build(RESUMABLE, data.num_classes)
    resumed = train(resumed_model, data, RESUMABLE, epochs=2, seed=1, resume=snap)
    assert _without_timing(resumed) == _without_timing(full)
    assert _same_weights(_weights(resumed_model), _weights(full_model))


def test_resume_with_other_params_is_refused(tmp_path: Path) -> None:
    from cifar_hpo.errors import UserError

    snaps: list[dict] = []
    _run(RESUMABLE, colour_data(), epochs=1, on_epoch=lambda r, s: snaps.append(s()))
    other = RESUMABLE.replace(lr=1e-2)
    with pytest.raises(UserError, match="different trial parameters"):
        train(models.build(other, 3), colour_data(), other, epochs=2, resume=snaps[0])


# ---------------------------------------------------------------- pieces


def test_lr_schedules() -> None:
    total = 100
    for schedule in ("onecycle", "cosine", "constant"):
        f = [lr_factor(schedule, s, total, 0.2) for s in range(total)]
        assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(f[:20], f[1:20], strict=False))
        if schedule == "constant":
            assert f[-1] == 1.0
        else:
            assert 0 < f[-1] <= 1 / 80 + 1e-9  # decays to 0 just after the last step
            assert all(a >= b for a, b in zip(f[20:], f[21:], strict=False))
    assert lr_factor("cosine", 60, 100, 0.2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert lr_factor("onecycle", 60, 100, 0.0) == pytest.approx(1 - 60 / 100)


def test_optimizer_gets_only_trainable_parameters() -> None:
    model = models.build(TrialParams(model="fast_cnn", arch={"width": 0.125}), 10)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen  # whitening weights and BatchNorm scales
    for name in ("sgd", "adam", "adamw"):
        opt = make_optimizer(model, SMALL.replace(optimizer=name, weight_decay=0.1))
        in_opt = [p for g in opt.param_groups for p in g["params"]]
        assert len(in_opt) == sum(p.requires_grad for p in model.parameters())
        assert not {id(p) for p in in_opt} & frozen
        decays = {g["weight_decay"] for g in opt.param_groups}
        assert decays == {0.1, 0.0}
    sgd = make_optimizer(model, SMALL.replace(optimizer="sgd", momentum=0.9))
    assert sgd.param_groups[0]["nesterov"] is True


def test_evaluate_metrics() -> None:
    data = colour_data(n_eval=30)

    class ColourOracle(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3)) * 10

    m = evaluate(ColourOracle(), data.eval_x, data.eval_y, mean=data.mean, std=data.std, batch_size=7)
    assert m.predictions.shape == (30,) and m.predictions.dtype == np.int64
    assert m.confusion.shape == (3, 3) and m.confusion.sum() == 30
    assert m.acc == pytest.approx(np.trace(m.confusion) / 30)
    assert m.acc > 0.9 and math.isfinite(m.loss)
    assert list(m.confusion.sum(1)) == [10, 10, 10]


# ---------------------------------------------------------------- entry points


def test_cli_train_prints_epochs_and_saves(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.pt"
    code = cli.main(
        [
            "train",
            "--model",
            "fast_cnn",
            "--data",
            str(image_folder),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--val-fraction",
            "0.2",
            "--set",
            "batch_size=16",
            "--set",
            "arch.width=0.125",
            "--save",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    lines = [line.split() for line in text.splitlines()]
    epochs = [cols for cols in lines if cols and cols[0] in ("1", "2")]
    assert len(epochs) == 2
    saved = checkpoint.load(out)
    assert saved["params"]["arch"] == {"width": 0.125, "stem_stride": 1, "tta": 2, "bn_momentum": 0.4}  # merged into the default arch
    assert saved["params"]["batch_size"] == 16
    assert saved["classes"] == ["cat", "dog", "frog"]
    model = models.build(TrialParams.from_dict(saved["params"]), 3)
    model.load_state_dict(saved["model_state"])


def test_cli_unknown_model_is_one_line(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--model", "nope", "--data", str(image_folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and len(err.strip().splitlines()) == 1


def test_bench_train_json(capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "train", "--models", "baseline_cnn,fast_cnn", "--steps", "1", "--batch-size", "4"]
    assert cli.main([*argv, "--precision", "fp32,bf16", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["img_s"]) == {"baseline_cnn", "fast_cnn"}
    assert all(v > 0 for per in result["img_s"].values() for v in per.values())
    assert set(result["img_s"]["fast_cnn"]) == {"fp32", "bf16"}


def test_amx_counts_only_where_the_cpu_has_it_and_onednn_may_use_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_hpo import device

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n")
    plain.write_text("processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: fpu avx2\n\n")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert device.cpu_info(str(amx)) == ("Some Xeon", frozenset({"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}))
    assert device.speed_flags(str(amx)) == ["amx_bf16", "avx512f", "avx2"] and device.speed_flags(str(plain)) == ["avx2"]
    assert device.cpu_has_amx(str(amx)) and not device.cpu_has_amx(str(plain))
    assert not device.cpu_has_amx(str(tmp_path / "none"))  # no /proc/cpuinfo: fp32
    for cap, has in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_AMX", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)  # bench profile --isa: bf16 autocast without tiles ran slower
        assert device.cpu_has_amx(str(amx)) is has, cap
        assert not device.cpu_has_amx(str(plain))


def test_bench_profile_takes_an_epoch_apart_per_instruction_set(capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "profile", "--isa", "native,avx2", "--threads", "1", "--repeats", "1", "--images", "1024"]
    assert cli.main([*argv, "--eval-images", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["isa"], r["format"]): r for r in result["rows"]}
    assert set(rows) == {(i, f) for i in ("native", "avx2") for f in ("channels_last", "contiguous")}
    for row in rows.values():
        assert row["forward_us"] > 0 and row["backward_us"] > 0 and row["evaluate_tta_us"] > row["evaluate_us"] > 0
        assert row["epoch_s"] > 0 and row["train_img_s"] > 0 and row["batch_size"] == 256  # fast_light's recipe
    avx2 = rows["avx2", "channels_last"]
    assert avx2["kernels"] == "aten AVX2, onednn cap AVX2" and avx2["bf16"] is False  # the cap reached the child
    assert rows["native", "channels_last"]["kernels"].endswith("onednn cap none")
    assert set(result["cpu_flags"]) <= {"amx_bf16", "avx512f", "avx2"}
    for bad, word in ((["--isa", "sse"], "--isa"), (["--formats", "nhwc"], "--formats"), (["--threads", "0"], "--threads"),
                      (["--study", "nope"], "nope"), (["--images", "1000"], "--images 1000: at least 1024")):  # fmt: skip
        assert cli.main(["bench", "profile", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and len(err.splitlines()) == 1, err


def test_bench_time_to_accuracy_json(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "time-to-accuracy", "--data", str(image_folder), "--cache-dir", str(tmp_path / "c")]
    argv += ["--device", "cpu", "--json", "--set", "batch_size=16", "--set", "arch.width=0.125"]
    assert cli.main([*argv, "--target", "0.0", "--epochs", "3"]) == 0  # any accuracy reaches 0: stops after epoch 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train_images"] == 60 and result["test_images"] == 18  # final_data: train + val, test
    assert result["reached"] is True and result["epochs"] == 1 and result["epochs_planned"] == 3
    assert result["seconds"] > 0 and 0.0 <= result["test_acc"] <= 1.0
    assert result["params"]["model"] == "fast_cnn" and result["params"]["arch"]["width"] == 0.125
    assert cli.main([*argv, "--target", "1.01", "--epochs", "2"]) == 1  # unreachable: all epochs, exit 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["reached"] is False and result["epochs"] == 2
    assert result["seconds_per_epoch"] > 0 and result["peak_mem_mb"] > 0 and result["seeds"] == [0]
    # --seeds: one run per seed, means with each seed's figures beside them.
    assert cli.main([*argv, "--target", "1.01", "--epochs", "1", "--seed", "3", "--seeds", "2"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seeds"] == [3, 4] and [r["seed"] for r in result["per_seed"]] == [3, 4]
    assert result["test_acc"] == pytest.approx(sum(r["test_acc"] for r in result["per_seed"]) / 2)
    assert result["test_acc_std"] >= 0 and result["seconds_std"] >= 0


def test_time_to_accuracy_plans_the_schedule_for_the_target() -> None:
    from cifar_hpo.bench.time_to_accuracy import LADDER, plan

    assert plan("cpu", 0.70) == (2, True)  # the light network's 2-epoch path
    assert plan("cpu", 0.90) == (LADDER["cpu"][1][1], False)
    assert plan("cpu", 0.94) == plan("cpu", 0.99) == (LADDER["cpu"][-1][1], False)
    assert plan("cuda", 0.94) == (10, False)
    epochs = [e for _, e, _ in LADDER["cpu"]]
    assert epochs == sorted(epochs)


# ---------------------------------------------------------------- airbench recipe pieces


def test_norm_lr_scale_multiplies_only_the_batchnorm_shifts_lr() -> None:
    from cifar_hpo.training import make_optimizer, set_lr

    model = models.build(SMALL.replace(norm_lr_scale=64.0), 3)
    optimizer = make_optimizer(model, SMALL.replace(norm_lr_scale=64.0))
    set_lr(optimizer, 0.5)
    bn_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert bn_ids and all(by_param[i] == 32.0 for i in bn_ids)
    others = [lr for i, lr in by_param.items() if i not in bn_ids]
    assert others and all(lr == 0.5 for lr in others)  # conv kernels, the head and the whitening bias
    assert id(model.whiten.bias) in by_param and by_param[id(model.whiten.bias)] == 0.5


def test_lookahead_ends_on_the_average_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_hpo.training import loop as train_module
    from cifar_hpo.training.optim import lookahead_decay

    assert lookahead_decay(0, 100) == 0.0 and lookahead_decay(100, 100) == 1.0
    assert 0.0 < lookahead_decay(50, 100) < lookahead_decay(99, 100) < 0.95**5 + 1e-12
    monkeypatch.setattr(train_module, "LOOKAHEAD_IMAGES", 64)  # average every 2 steps of 32 here
    params = SMALL.replace(lookahead=True, norm_lr_scale=8.0, arch={"width": 0.125, "tta": 2})
    data = colour_data()
    plain_model, _ = _run(params.replace(lookahead=False), data, epochs=3, seed=1)
    full_model, full = _run(params, data, epochs=3, seed=1)
    assert not _same_weights(_weights(plain_model), _weights(full_model))  # the averaging changed the run
    assert full.status == "ok" and full.epochs[-1].val_acc > 0.6

    path = tmp_path / "snap.pt"
    assert _crash_after_epoch_1(params, data, 3, path).status == "stopped"
    assert checkpoint.load(path)["lookahead"] is not None
    torch.manual_seed(99)
    resumed_model = models.build(params, data.num_classes)
    resumed = train(resumed_model, data, params, epochs=3, seed=1, resume=checkpoint.load(path))
    assert _without_timing(resumed) == _without_timing(full)
    assert _same_weights(_weights(resumed_model), _weights(full_model))


def test_epochs_before_the_last_are_evaluated_without_test_time_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    # TTA (6 passes per image at level 2) only where it counts: the run's last evaluation.
    seen: list[int] = []
    real = train_mod.evaluate

    def spy(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(model.tta)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    params = SMALL.replace(arch={"width": 0.125, "tta": 2})
    model = models.build(params, 3)
    train_mod.train(model, colour_data(n_train=64, n_eval=16), params, epochs=3, seed=0)
    assert seen == [0, 0, 2] and model.tta == 2


def test_auto_precision_uses_bf16_on_cuda_and_on_cpus_with_amx_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_hpo import device

    assert isinstance(device.cpu_has_amx(), bool)  # reads /proc/cpuinfo (False where there is none)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision_mod, "cpu_has_amx", lambda: False)
    assert not precision_mod.use_bf16(cpu, "auto") and precision_mod.use_bf16(cuda, "auto")
    assert precision_mod.use_bf16(cpu, "bf16") and not precision_mod.use_bf16(cpu, "fp32")
    monkeypatch.setattr(precision_mod, "cpu_has_amx", lambda: True)
    assert precision_mod.use_bf16(cpu, "auto") and not precision_mod.use_bf16(cuda, "fp32")
