"""Learning-curve banks and their replay (cifar-hpo bench curves / bench search) on tiny synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from cifar_hpo.bench import curves, search
from cifar_hpo.bench.search import Rule, compare, default_rules, replay, spearman
from cifar_hpo.study.pruning import rung_epochs
from cifar_hpo.study.spec import PrunerSpec

EPOCHS = 8


def _cfg(i: int, finals: float, *, early: float | None = None, probe_cost: float = 0.0, ema_cost: float = 0.0) -> dict[str, Any]:
    """A curve rising to ``finals``; ``early`` sets the first epochs' level (curves that cross)."""
    start = finals - 0.3 if early is None else early
    val = [start + (finals - start) * (e / EPOCHS) ** 0.5 for e in range(1, EPOCHS + 1)]
    return {
        "index": i,
        "status": "ok",
        "params": {"x": i / 100},
        "distributions": {"x": optuna.distributions.distribution_to_json(optuna.distributions.FloatDistribution(0.0, 1.0))},
        "val_acc": val,
        "probe_acc": [v + 0.05 if e in curves.PROBE_EPOCHS else None for e, v in enumerate(val, 1)],
        "probe_cost": [probe_cost if e in curves.PROBE_EPOCHS else 0.0 for e in range(1, EPOCHS + 1)],
        "ema_acc": [v + 0.01 for v in val],
        "ema_cost": ema_cost,
    }


def _bank(design: str, configs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"header": {"version": 1, "design": design, "epochs": EPOCHS, "train_images": 10, "val_images": 10}, "configs": configs}


def _banks(m: int = 16, planted: int | None = 5, probe_cost: float = 0.0) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(0)
    finals = rng.uniform(0.4, 0.7, m)
    if planted is not None:
        finals[planted] = 0.9
    one = [_cfg(i, float(f), ema_cost=0.1) for i, f in enumerate(finals)]
    wsd = [_cfg(i, float(f), probe_cost=probe_cost) for i, f in enumerate(finals)]
    return {"onecycle": _bank("onecycle", one), "wsd": _bank("wsd", wsd)}


def test_spearman_matches_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rung_epochs_are_optunas_geometric_rungs() -> None:
    assert rung_epochs("successive_halving", 1, 3, 8) == [1, 3]
    assert rung_epochs("hyperband", 1, 2, 10) == [1, 2, 4, 8]
    assert rung_epochs("none", 1, 3, 8) == []


def test_a_pruner_that_prunes_nothing_consumes_exactly_the_unpruned_epochs() -> None:
    configs = _banks()["wsd"]["configs"]
    for rule in (Rule("none", "none"), Rule("none, wsd", "none", "wsd", "probe")):
        out = replay(rule, configs[:10], EPOCHS, seed=0)
        assert out.epochs == 10 * EPOCHS
        assert out.best == max(max(c["val_acc"]) for c in configs[:10])
    result = compare(_banks(), [Rule("none", "none")], trials=10, seeds=3)
    assert result["table"]["none"]["epochs_ratio"] == pytest.approx(1.0)
    assert result["table"]["none"]["regret_points"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "rule",
    [
        Rule("sh", "successive_halving", "wsd", "probe", 1, 3),
        Rule("sh4", "successive_halving", "onecycle", "plain", 1, 4),
        Rule("hb", "hyperband", "onecycle", "ema", 1, 3),
        Rule("median", "median"),
        Rule("top", "topk", k=2),
        Rule("rung top-1", "rung_top_k", "wsd", "probe", 1, 3, k=1),
    ],
)
def test_a_planted_best_configuration_is_never_pruned(rule: Rule) -> None:
    # Config 5 is ahead at every epoch and every fidelity: a rule that ranks by
    # the rung accuracy must finish it, so its regret is exactly zero on every draw.
    result = compare(_banks(planted=5), [rule], trials=16, seeds=6)
    assert result["table"][rule.name]["regret_points_max"] == pytest.approx(0.0)
    assert result["table"][rule.name]["epochs_ratio"] < 1.0  # and it did prune something


def test_crossing_curves_fool_the_plain_fidelity_but_not_the_probe() -> None:
    # The best configuration is lowest before its final decay (plain accuracy) but its probe says the truth.
    banks = _banks(planted=None)
    for design in ("onecycle", "wsd"):
        best = _cfg(3, 0.95)
        best["val_acc"] = [0.05] * (EPOCHS - 1) + [0.95]
        best["probe_acc"] = [0.99 if e in curves.PROBE_EPOCHS else None for e in range(1, EPOCHS + 1)]
        banks[design]["configs"][3] = best
    plain = Rule("plain", "successive_halving", "onecycle", "plain", 2, 3)
    probe = Rule("probe", "successive_halving", "wsd", "probe", 2, 3)
    table = compare(banks, [plain, probe], trials=16, seeds=5)["table"]
    assert table["probe"]["regret_points_max"] == pytest.approx(0.0)
    assert table["plain"]["regret_points"] > 10


def test_extra_costs_are_counted() -> None:
    banks = _banks(probe_cost=0.5)
    configs = banks["wsd"]["configs"][:1]  # a lone trial is never pruned: 8 epochs + probes at rungs 1, 3
    out = replay(Rule("sh", "successive_halving", "wsd", "probe", 1, 3), configs, EPOCHS, seed=0)
    assert out.epochs == pytest.approx(EPOCHS + 0.5)  # a probe at rung 3; rung 1 compares the plain accuracy
    out = replay(Rule("hb", "hyperband", "onecycle", "ema", 1, 3), banks["onecycle"]["configs"][:1], EPOCHS, seed=0)
    assert out.epochs == pytest.approx(EPOCHS + 2 * 0.1)  # EMA evaluated at rungs 1 and 3 only
    top = replay(Rule("top", "topk", k=3), banks["onecycle"]["configs"][:10], EPOCHS, seed=0)
    assert top.epochs == pytest.approx(10 * 1 + 3 * (EPOCHS - 1))


def test_default_rules_contain_the_baselines_and_ours() -> None:
    names = [r.name for r in default_rules(24, EPOCHS, PrunerSpec(kind="successive_halving", fidelity="probe"))]
    assert names[0] == "none" and names[-1] == "ours"
    assert any(n.startswith("median") for n in names) and any(n.startswith("hyperband") for n in names)
    assert any(n.startswith("top-") for n in names)


def test_sampler_check_runs_real_studies_on_the_bank() -> None:
    out = search.sampler_check(_banks()["onecycle"], trials=[4, 8], startups=[2], seeds=3)
    for how in ("surrogate", "lookup"):
        assert set(out[how]) == {"random", "tpe startup 2"}
        for per in out[how].values():
            assert per["8"]["regret_points"] <= per["4"]["regret_points"]  # more trials never hurt
            assert per["8"]["regret_points"] >= 0  # regret against the stand-in's maximum


# ---------------------------------------------------------------- recording


def test_recording_is_resumable_and_appends_one_config_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_hpo.study.spec import load_spec

    calls: list[tuple[int, str]] = []

    def fake_train(config: dict[str, Any], design: str, data: Any, epochs: int, seed: int) -> dict[str, Any]:
        calls.append((seed, design))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while training the second configuration's first design
        return {"status": "ok", "val_acc": [0.5] * epochs, "probe_acc": [None] * epochs, "probe_cost": [0.0] * epochs,
                "ema_acc": [None] * epochs, "ema_cost": 0.0, "steps_per_epoch": 1, "seconds": 0.0}  # fmt: skip

    class Data:
        train_y = eval_y = [0] * 10
        split_hash = "h"
        device = "cpu"

    monkeypatch.setattr(curves, "train_config", fake_train)
    spec = load_spec("fast")
    specs = [curves.BankSpec("fast", d, 2, 3, 10) for d in ("onecycle", "wsd")]
    with pytest.raises(KeyboardInterrupt):
        curves.record(specs, spec, Data(), folder=tmp_path, log=lambda s: None)
    saved = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert [len(b["configs"]) for b in saved] == [1, 1]  # the finished configuration, nothing half-written
    paths = curves.record(specs, spec, Data(), folder=tmp_path, log=lambda s: None)
    seeds = [s for s, _ in calls]
    assert seeds == [0, 0, 1, 1, 1, 2, 2]  # config 0 was not trained again; config 1 restarted
    banks = [json.loads(p.read_text()) for p in paths]
    assert [[c["index"] for c in b["configs"]] for b in banks] == [[0, 1, 2], [0, 1, 2]]
    assert banks[0]["configs"][1]["params"] == banks[1]["configs"][1]["params"]  # same draws in every design


@pytest.mark.slow
def test_recording_trains_real_curves_on_tiny_data(tmp_path: Path) -> None:
    from cifar_hpo.study.spec import load_spec
    from tests.test_train import colour_data

    spec = load_spec("fast")
    specs = [curves.BankSpec("fast", d, 3, 2, 240) for d in ("onecycle", "wsd")]
    paths = curves.record(specs, spec, colour_data(), folder=tmp_path, log=lambda s: None)
    one, wsd = (json.loads(p.read_text()) for p in paths)
    for cfg in one["configs"]:
        assert len(cfg["val_acc"]) == 3 and all(a is not None for a in cfg["ema_acc"])
        assert cfg["trial_params"]["schedule"] == "onecycle"
    for cfg in wsd["configs"]:
        # probes at the recorded epochs inside the run (1 and 2 of 3), none at the last
        assert [a is not None for a in cfg["probe_acc"]] == [True, True, False]
        assert cfg["probe_cost"][0] > 0 and cfg["probe_cost"][2] == 0
    banks = search.load_banks(paths)
    table = compare(banks, [Rule("none", "none")], trials=2, seeds=2)["table"]
    assert table["none"]["epochs_ratio"] == pytest.approx(1.0)


def test_bench_search_json_on_bank_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_hpo import cli

    paths = []
    for design, bank in _banks(m=16).items():
        path = tmp_path / f"{design}.json"
        path.write_text(json.dumps(bank))
        paths.append(path)
    plot = tmp_path / "search.png"
    argv = ["bench", "search", "--bank", str(paths[0]), "--bank", str(paths[1]), "--trials", "12", "--seeds", "20",
            "--plot", str(plot), "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seeds"] == 20 and out["trials"] == 12
    assert out["rules"]["none"]["epochs_ratio"] == 1.0
    assert 0 < out["epochs_ratio"] < 1 and out["epochs_ratio"] == round(out["rules"]["ours"]["epochs_ratio"], 4)
    assert out["regret_points"] == round(out["rules"]["ours"]["regret_points"], 3)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_search_without_a_bank_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_hpo import cli

    assert cli.main(["bench", "search", "--no-record", "--bank-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no onecycle bank" in err and "Traceback" not in err


def test_the_shipped_rule_is_not_its_own_rival() -> None:
    plain = default_rules(24, EPOCHS, PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="plain"))
    assert search.twins(plain) == ["successive halving rf4"]
    probe = default_rules(24, EPOCHS, PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="probe"))
    assert search.twins(probe) == []
