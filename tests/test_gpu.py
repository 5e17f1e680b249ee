"""Every CUDA path, on every device present, and its CUDA-only branches on a CPU; `cifar-hpo bench device`.

Each device test runs on "cpu" and on "cuda" (marked ``gpu``: conftest skips it without CUDA, and
``cifar-hpo bench device`` runs ``pytest -m gpu`` on a GPU machine). The branches that run only on
CUDA (the finite-loss check cadence, the workers' GPU assignment, peak memory, the CUDA random state
in snapshots, the compile gate) are also tested here on a CPU with the device faked.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli, data, models
from cifar_hpo.bench import device as bench_device
from cifar_hpo.data import DeviceData
from cifar_hpo.models import final as finalmodel
from cifar_hpo.params import AUG_OPS, TrialParams
from cifar_hpo.storage import checkpoint
from cifar_hpo.study.supervisor import worker_device
from cifar_hpo.training import augment, loop, precision
from tests.test_train import RESUMABLE, SMALL, _crash_after_epoch_1, _InfAfter, _same_weights, _weights, _without_timing, colour_data

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Small enough to train in seconds on a CPU (as tests/test_models.py); any other model its default arch.
SMALL_ARCH = {"fast_cnn": {"width": 0.125}, "mlp": {"hidden": 32}, "resnet18": {"cifar_stem": False},
              "densenet121": {"cifar_stem": False}}  # fmt: skip


def on(dd: DeviceData, device: str) -> DeviceData:
    """``dd`` with its tensors moved to ``device``."""
    return DeviceData(dd.train_x.to(device), dd.train_y.to(device), dd.eval_x.to(device), dd.eval_y.to(device), dd.eval_name,
                      dd.classes, dd.mean, dd.std, dd.split_hash)  # fmt: skip


def _run_on(params: TrialParams, dd: DeviceData, epochs: int, seed: int = 0, **kw: Any) -> tuple[torch.nn.Module, loop.History]:
    torch.manual_seed(seed)
    model = models.build(params, dd.num_classes)
    return model, loop.train(model, dd, params, epochs=epochs, seed=seed, **kw)


def _close_histories(a: loop.History, b: loop.History, rel: float, n_eval: int) -> None:
    """The same epochs, losses within ``rel``, accuracies within one image of ``n_eval``."""
    assert [e.epoch for e in a.epochs] == [e.epoch for e in b.epochs]
    for x, y in zip(a.epochs, b.epochs, strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, rel=rel) and x.val_loss == pytest.approx(y.val_loss, rel=rel)
        assert abs(x.val_acc - y.val_acc) <= 1 / n_eval + 1e-9 and x.lr == pytest.approx(y.lr)


# ---------------------------------------------------------------- models, precision, compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_model_trains_a_step_in_both_precisions(name: str, prec: str, device: str) -> None:
    torch.manual_seed(0)
    params = TrialParams(model=name, arch=SMALL_ARCH.get(name, {}), pretrained=False, precision=prec)
    model = models.build(params, 10).to(device).train()
    x = torch.randn(4, 3, 32, 32, device=device)
    if precision.use_channels_last(model):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        x = x.contiguous(memory_format=torch.channels_last)
    with precision.autocast(torch.device(device), prec):
        logits = model(x)
    assert logits.dtype == (torch.bfloat16 if prec == "bf16" else torch.float32)
    loss = F.cross_entropy(logits.float(), torch.tensor([0, 3, 6, 9], device=device))
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == device and torch.isfinite(g).all() for g in grads)


def test_compile_gate_is_cuda_only_by_default() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.compile_wanted(SMALL.replace(compile=True), cuda)
    assert not loop.compile_wanted(SMALL.replace(compile=True), cpu)
    assert not loop.compile_wanted(SMALL, cuda) and not loop.compile_wanted(SMALL, cpu)


def _spy_compile(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every torch.compile call (and still compile)."""
    calls: list[object] = []
    real = torch.compile

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_compile_asked_for_compiles_on_cuda_only(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: (calls.append(model), model)[1])  # the gate only: no compile
    params = TrialParams(model="mlp", arch={"hidden": 16}, batch_size=32, compile=True, precision="fp32")
    _, history = _run_on(params, on(colour_data(n_train=64, n_eval=16), device), epochs=1)
    assert history.status == "ok" and len(calls) == (1 if device == "cuda" else 0)


COMPILE_CASES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", COMPILE_CASES)
def test_compiled_training_matches_eager(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One tiny model, fp32, no dropout (a compiled dropout draws other numbers): the same run within rounding.
    monkeypatch.setattr(loop, "compile_wanted", lambda params, dev: params.compile)  # also on a CPU
    calls = _spy_compile(monkeypatch)
    params = TrialParams(model="mlp", arch={"hidden": 16, "depth": 1}, batch_size=32, lr=3e-3, precision="fp32")
    dd = on(colour_data(n_train=64, n_eval=16), device)
    _, eager = _run_on(params, dd, epochs=2, seed=1)
    _, compiled = _run_on(params.replace(compile=True), dd, epochs=2, seed=1)
    assert len(calls) == 1 and eager.status == compiled.status == "ok"
    _close_histories(compiled, eager, rel=1e-3, n_eval=16)


# ---------------------------------------------------------------- data and augmentation on the device


@pytest.mark.parametrize("device", DEVICES)
def test_data_and_augmentation_stay_on_the_device(device: str, image_folder: Path, tmp_path: Path) -> None:
    ds = data.load_dataset(str(image_folder), cache_dir=tmp_path / "cache", progress=False)
    split = data.split_dataset(ds, val_fraction=0.2)
    for dd in (data.trial_data(ds, split, torch.device(device)), data.final_data(ds, split, torch.device(device))):
        assert dd.device.type == device
        assert {t.device.type for t in (dd.train_x, dd.train_y, dd.eval_x, dd.eval_y)} == {device}
        assert dd.train_x.dtype == dd.eval_x.dtype == torch.uint8 and dd.train_y.dtype == torch.int64
    n = len(dd.train_y)
    flips = augment.alternating_flips(n, 1, seed=0, device=device)
    batches = list(augment.train_batches(dd, 16, strength=1.0, ops=AUG_OPS, generator=augment.make_generator(device, 0), flips=flips))
    assert batches and sum(len(y) for _, y in batches) == n - n % 16
    for x, y in batches:
        assert x.device.type == y.device.type == device and x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert torch.isfinite(x).all()
    x, y = next(augment.eval_batches(dd.eval_x, dd.eval_y, 8, dd.mean, dd.std))
    assert x.device.type == y.device.type == device


# ---------------------------------------------------------------- snapshots and resume


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [RESUMABLE, SMALL], ids=["mlp-adamw-dropout", "fast_cnn-sgd-bn"])
def test_resume_on_the_device_equals_the_uninterrupted_run(params: TrialParams, device: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if device == "cuda":  # deterministic kernels: what is left to differ is the random state, which this checks
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    dd = on(colour_data(n_train=128, n_eval=32), device)
    full_model, full = _run_on(params, dd, epochs=3, seed=1)
    path = tmp_path / "snap.pt"
    assert _crash_after_epoch_1(params, dd, 3, path).status == "stopped"
    snap = checkpoint.load(path)
    assert ("cuda" in snap["rng"]) == (device == "cuda")
    assert all(v.device.type == "cpu" for v in snap["model_state"].values())  # a snapshot loads anywhere
    torch.manual_seed(99)
    resumed_model = models.build(params, dd.num_classes)
    resumed = loop.train(resumed_model, dd, params, epochs=3, seed=1, resume=snap)
    assert resumed.status == "ok"
    if device == "cpu":
        assert _without_timing(resumed) == _without_timing(full)
        assert _same_weights(_weights(resumed_model), _weights(full_model))
    else:
        _close_histories(resumed, full, rel=1e-4, n_eval=len(dd.eval_y))
        got = _weights(resumed_model)
        for key, want in _weights(full_model).items():
            torch.testing.assert_close(got[key], want, rtol=1e-3, atol=1e-4, msg=key)


def test_snapshot_records_and_restores_the_cuda_random_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    state = torch.arange(16, dtype=torch.uint8)
    asked: list[object] = []
    restored: list[tuple[torch.Tensor, object]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": (asked.append(device), state.clone())[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": restored.append((new, device)))
    generator = torch.Generator().manual_seed(5)
    rng = loop.rng_state(cuda, generator)
    assert set(rng) == {"torch", "generator", "cuda"} and torch.equal(rng["cuda"], state) and asked == [cuda]
    assert set(loop.rng_state(cpu, generator)) == {"torch", "generator"}  # a CPU run asks CUDA nothing
    # Through a snapshot file, as a resumed trial reads it: torch's and the generator's states come back too.
    torch.manual_seed(7)
    want_torch, want_gen = torch.rand(3), torch.rand(3, generator=generator)
    torch.manual_seed(7)
    rng = loop.rng_state(cuda, torch.Generator().manual_seed(5))
    checkpoint.save(loop._to_cpu({"rng": rng}), tmp_path / "snap.pt")
    loaded = checkpoint.load(tmp_path / "snap.pt")["rng"]
    fresh = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    loop.restore_rng(loaded, cuda, fresh)
    assert len(restored) == 1 and torch.equal(restored[0][0], state) and restored[0][1] == cuda
    assert torch.equal(torch.rand(3), want_torch) and torch.equal(torch.rand(3, generator=fresh), want_gen)
    loop.restore_rng({k: v for k, v in loaded.items() if k != "cuda"}, cuda, fresh)  # a snapshot from a CPU run
    loop.restore_rng(loaded, cpu, fresh)  # resumed on a CPU: the CUDA entry is not used
    assert len(restored) == 1


# ---------------------------------------------------------------- the finite-loss check and memory


def test_finite_check_cadence_per_device() -> None:
    assert loop.finite_check_every(torch.device("cpu")) == 1
    assert loop.finite_check_every(torch.device("cuda")) == loop.finite_check_every(torch.device("cuda:1")) == loop.CUDA_FINITE_CHECK_EVERY


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("every", "bad", "caught_at"), [(1, 5, 5), (4, 5, 8), (4, 8, 8), (4, 9, 10), (25, 5, 10)])
def test_a_nonfinite_loss_is_caught_by_the_next_check(every: int, bad: int, caught_at: int, device: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # 10 steps per epoch: a bad loss at step `bad` is caught at the next multiple of `every`, or at the epoch's end.
    monkeypatch.setattr(loop, "finite_check_every", lambda dev: every)
    dd = on(colour_data(n_train=320, n_eval=30), device)
    torch.manual_seed(0)
    model = _InfAfter(models.build(SMALL, 3), bad=bad)
    history = loop.train(model, dd, SMALL, epochs=2)
    assert history.status == "nonfinite" and history.epochs == []
    assert model.calls == caught_at  # no training step after the check that caught it
    finite = all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert finite == (every == 1)  # checked before the step, the weights stay finite; checked after, they may not


def test_peak_memory_and_sync_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: (asked.append(device), 3 * 2**20)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: asked.append(("sync", device)))
    assert precision.peak_mem_mb(cuda) == 3.0 and asked == [cuda]
    precision.sync(cuda)
    assert asked[-1] == ("sync", cuda)
    asked.clear()
    assert precision.peak_mem_mb(torch.device("cpu")) > 0  # the process's max RSS, CUDA not asked
    precision.sync(torch.device("cpu"))
    assert asked == []


@pytest.mark.parametrize("device", DEVICES)
def test_epochs_report_the_devices_peak_memory(device: str) -> None:
    _, history = _run_on(RESUMABLE, on(colour_data(n_train=64, n_eval=16), device), epochs=1)
    assert history.device.startswith(device) and history.epochs[0].peak_mem_mb > 0


# ---------------------------------------------------------------- workers


def test_worker_device_round_robin_over_the_visible_gpus() -> None:
    assert [worker_device("cuda", i, 2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device("auto", i, 1) for i in range(3)] == ["cuda:0"] * 3  # two or more workers share one GPU
    assert [worker_device("auto", i, 3) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    # No GPU, a CPU asked for, or a GPU named: as asked (CPU workers then take a share of the cores).
    assert worker_device("auto", 1, 0) == "auto" and worker_device("cuda", 0, 0) == "cuda"
    assert worker_device("cpu", 1, 4) == "cpu" and worker_device("cuda:1", 0, 2) == "cuda:1"


WORKER_CASES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", WORKER_CASES)
def test_two_workers_share_one_device(device: str, tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), n_train=20, n_test=4)
    name = f"gpu{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.toml").write_text(study_toml(name=name, epochs=1, trials=3))
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    cmd = [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(tmp_path / f"{name}.toml"), "--data", str(folder),
           "--trials", "3", "--workers", "2", "--device", device, "--results", str(tmp_path / "results"),
           "--cache-dir", str(tmp_path / "cache"), "--storage", url]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CIFAR_HPO_STORAGE"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "database is locked" not in output
    where = dict(re.findall(r"^\[w(\d)\] worker pid \d+ on (\S+?),?(?: |$)", output, re.M))
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    assert where == {str(i): worker_device(device, i, gpus) for i in range(2)}, output[-2000:]
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    names = {t.user_attrs["device"] for t in finished}
    assert len(names) == 1 and (device == "cpu") == next(iter(names)).startswith("cpu")


# ---------------------------------------------------------------- final model and export


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_trained_final_model_exports_with_onnx_parity(device: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    folder = make_image_folder(tmp_path / "imgs", n_train=20, n_test=6)
    (tmp_path / "demo.toml").write_text(study_toml(epochs=1, trials=1))
    results, cache, out = tmp_path / "res", tmp_path / "cache", tmp_path / "exported"
    assert cli.main(["retrain", "--study", str(tmp_path / "demo.toml"), "--default-params", "--data", str(folder), "--seeds", "1",
                     "--storage", f"sqlite:///{tmp_path}/absent.db", "--results", str(results), "--cache-dir", str(cache),
                     "--device", device]) == 0  # fmt: skip
    final = finalmodel.load_final(results / "demo" / "final.pt")
    assert final["device"].startswith(device)
    assert all(t.device.type == "cpu" for t in final["model_state"].values())  # trained on the device, loadable anywhere
    assert cli.main(["export", "--study", "demo", "--results", str(results), "--out", str(out), "--cache-dir", str(cache)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert (out / "model.onnx").is_file() and "| `model.onnx` |" in card
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    import onnxruntime as ort  # here: the onnx extra is optional (importorskip above)

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy().astype("float32") / 255})[0]
    with torch.no_grad():
        want = finalmodel.deployed(final)(x).numpy()
    assert abs(got - want).max() < 1e-4 and (got.argmax(1) == want.argmax(1)).all()


# ---------------------------------------------------------------- cifar-hpo bench device


def _step(name: str, code: str, limit: float = 60.0, **kw: Any) -> bench_device.Step:
    return bench_device.Step(name, ("-c", code), f"python -c {name}", limit, lambda rc, js, lines: (rc == 0, f"rc {rc}"), **kw)


def test_device_plan_fits_the_gpu_budget_and_names_the_steps(tmp_path: Path) -> None:
    gpu = bench_device.plan(True, "/data.tar.gz", tmp_path, tmp_path)
    cpu = bench_device.plan(False, "/data.tar.gz", tmp_path, None)
    assert [s.name for s in gpu] == [s.name for s in cpu] == ["tests", "train", "data", "time-to-accuracy", "study"]
    assert sum(s.limit_s for s in gpu) <= bench_device.GPU_BUDGET_S - 15  # the card and start-up fit beside them
    for steps, dev in ((gpu, "cuda"), (cpu, "cpu")):
        for s in steps[1:]:
            assert s.argv[:2] == ("-m", "cifar_hpo.cli") and s.argv[s.argv.index("--device") + 1] == dev, s
            assert s.shown.startswith("cifar-hpo ") and s.json == (s.name != "study")
    shown = {s.name: s.shown for s in gpu}
    assert "--target 0.94" in shown["time-to-accuracy"] and "--target 0.70" in {s.name: s.shown for s in cpu}["time-to-accuracy"]
    assert "--study densenet" in shown["study"] and "pretrained=false" in shown["study"] and "--budget" in shown["study"]
    assert str(tmp_path / "study.db") in shown["study"] and "--data /data.tar.gz" in shown["study"]
    assert gpu[0].argv[:5] == ("-m", "pytest", "-m", "gpu", "-q") and gpu[0].cwd == tmp_path and gpu[0].skip is None
    assert cpu[0].skip and "no tests folder" in cpu[0].skip


def test_device_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench_device.default_data(None) == "cifar10"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz").write_bytes(b"")
    assert bench_device.default_data(None) == str(tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz")
    assert bench_device.default_data("cifar10") == "cifar10" and bench_device.default_data("shared") == str(tmp_path / "shared")


def test_device_step_parses_json_keeps_failures_and_stops_at_its_limit(tmp_path: Path) -> None:
    env = bench_device.step_env()
    ok = bench_device.run_step(_step("ok", "print('hello'); print('{\"a\": 1}'); print()"), tmp_path, env)
    assert (ok.status, ok.exit_code, ok.json, ok.tail) == ("passed", 0, {"a": 1}, [])
    assert (tmp_path / "ok.log").read_text().startswith("hello")
    bad = bench_device.run_step(_step("bad", "import sys; print('boom'); sys.exit(3)"), tmp_path, env)
    assert (bad.status, bad.exit_code, bad.json, bad.tail) == ("failed", 3, None, ["boom"])
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(p.pid, flush=True); time.sleep(60)")  # fmt: skip
    slow = bench_device.run_step(_step("slow", code, limit=3.0), tmp_path, env)
    assert slow.status == "timed out" and slow.seconds < 30 and "limit of 3 s" in slow.result
    child = int(slow.tail[0])
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")  # its child was stopped with it
    skipped = bench_device.run_step(_step("skip", "raise SystemExit(1)", skip="not here"), tmp_path, env)
    assert (skipped.status, skipped.result, skipped.exit_code) == ("skipped", "not here", None)
    assert not (tmp_path / "skip.log").exists()


def test_device_verdicts() -> None:
    tta = {"reached": False, "target": 0.94, "test_acc": 0.905, "epochs": 10, "seconds": 30.0, "seconds_per_epoch": 3.0,
           "images_per_s": 5e4}
    assert bench_device._judge_tta(1, tta, [])[0]  # ran to the end; 0.94 is out of reach on the JPEG images
    assert "not reached" in bench_device._judge_tta(1, tta, [])[1]
    assert not bench_device._judge_tta(2, None, ["cifar-hpo: error: no data"])[0]
    assert bench_device._judge_tests(0, None, ["...", "3 passed, 2 skipped, 400 deselected in 9.1s"]) == (
        True, "3 passed, 2 skipped, 400 deselected in 9.1s")  # fmt: skip
    assert not bench_device._judge_tests(1, None, ["1 failed, 2 passed in 3.0s"])[0]
    good = "study 'densenet' (x): done\nstudy 'densenet': 2 complete, 1 pruned, 0 failed; best val_acc 0.4 (trial #1)".splitlines()
    assert bench_device._judge_study(0, None, good) == (True, good[-1])
    assert not bench_device._judge_study(0, None, [good[0], good[1].replace("0 failed", "1 failed")])[0]
    assert bench_device._judge_study(2, None, ["cifar-hpo run: error: unrecognized arguments: --budget 2m"]) == (
        False, "exit 2: cifar-hpo run: error: unrecognized arguments: --budget 2m")  # fmt: skip
    assert bench_device._judge_train(0, {"img_s": {"mlp": {"fp32": 1234.5}}}, [])[1] == "img/s: mlp fp32 1,234"


def test_bench_device_writes_one_record_and_says_what_a_cpu_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    steps = [_step("one", "print('{\"x\": 2}')", gpu_part="the big one"), _step("two", "print('two')", gpu_part="the other", json=False)]
    monkeypatch.setattr(bench_device, "plan", lambda cuda, data, scratch, root: steps)
    out = tmp_path / "out"
    assert cli.main(["bench", "device", "--out", str(out), "--data", "cifar10", "--json"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "no CUDA device: running the CPU parts only; skipped: the big one, the other"
    assert json.loads(text[-1])["passed"] is True and json.loads(text[-1])["one"].startswith("passed")
    record = json.loads((out / "device.json").read_text())
    assert record["cuda"] is False and record["data"] == "cifar10" and [s["name"] for s in record["steps"]] == ["one", "two"]
    one, two = record["steps"]
    assert one["json"] == {"x": 2} and one["exit_code"] == 0 and one["seconds"] > 0 and one["log"] == "one.log"
    assert two["json"] is None and two["tail"] == ["two"]
    card = record["card"]
    assert card["torch"] == str(torch.__version__) and card["packages"]["torch"] and card["cpu"]["cores_usable"] >= 1
    assert set(card["cpu"]["flags"]) | set(card["cpu"]["missing_flags"]) == set(bench_device.SPEED_FLAGS)
    page = (out / "device.md").read_text()
    assert page.startswith("# Device check: passed") and "| one | passed |" in page and "| CPU |" in page and "| torch |" in page
    assert {p.name for p in out.iterdir()} == {"device.json", "device.md", "one.log", "two.log"}
    # A failed step: the others still run, exit 1, its output's end on the page.
    steps[0] = _step("one", "import sys; print('it broke'); sys.exit(4)", gpu_part="the big one")
    assert cli.main(["bench", "device", "--out", str(out), "--data", "cifar10"]) == 1
    record = json.loads((out / "device.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["failed", "passed"] and record["passed"] is False
    assert "## one: failed" in (out / "device.md").read_text() and "it broke" in (out / "device.md").read_text()


def test_bench_device_help_is_instant_and_lists_its_flags() -> None:
    run = subprocess.run([sys.executable, "-m", "cifar_hpo.cli", "bench", "device", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert run.returncode == 0 and all(f in run.stdout for f in ("--data", "--out", "--json", "results/device"))
