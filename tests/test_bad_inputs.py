"""Issue 20, item 5 (B): bad inputs and other tools' databases around studies, storage, status and the dashboard.

Each bad input is one line (exit status 2) and leaves nothing behind: no study, no empty database,
no trial. What cifar-hpo did not create it does not write to.

    python -m pytest tests/test_bad_inputs.py -q
"""

from __future__ import annotations

import hashlib
import math
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState
from test_hardening import _one_line_error

from cifar_hpo import cli, models, storage
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.study import create, supervisor
from cifar_hpo.study.search_space import suggest_params
from cifar_hpo.study.spec import list_specs, load_spec, parse_spec

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c"), n_train=10, n_test=2)


def _study_file(tmp_path: Path, *, epochs: int = 1, trials: int = 1) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=epochs, trials=trials))
    return f


def _run(tmp_path: Path, folder: Path, study: Path, *extra: str, db: Path | None = None) -> list[str]:
    url = f"sqlite:///{db or tmp_path / 'db.sqlite3'}"
    return ["run", "--study", str(study), "--data", str(folder), "--device", "cpu", "--storage", url,
            "--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), *extra]  # fmt: skip


def _foreign(db: Path, name: str = "tiny", *, trials: int = 3, directions: tuple[str, ...] = ("maximize",)) -> str:
    """A database another tool made with plain Optuna: journal mode delete, a study ``name`` searching ``lr``."""
    url = f"sqlite:///{db}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=list(directions))
    study.optimize(lambda t: tuple(t.suggest_float("lr", 0, 1) for _ in directions), n_trials=trials)
    return url


def _state(db: Path) -> tuple[str, str, list[str]]:
    """The file's bytes (hashed), its journal mode read without changing anything, its -wal, -shm or -journal files."""
    con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    con.close()
    return hashlib.sha256(db.read_bytes()).hexdigest(), mode, sorted(p.name for p in db.parent.glob(f"{db.name}*"))


# ---------------------------------------------------------------- another tool's study (case 1)


def test_a_study_another_tool_made_is_refused_and_left_alone(tmp_path: Path, folder: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    db = tmp_path / "db.sqlite3"
    url = _foreign(db)
    before = _state(db)
    code = cli.main(_run(tmp_path, folder, _study_file(tmp_path, trials=5)))
    _one_line_error(capsys, code, "was not made by cifar-hpo")
    assert _state(db) == before  # not even the journal mode changed
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 and study.user_attrs == {}
    assert not (tmp_path / "results").exists()


def test_an_empty_study_of_another_tool_is_refused_after_waiting_for_a_creator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(create, "CREATING_S", 0.3)
    url = _foreign(tmp_path / "db.sqlite3", trials=0)
    spec = load_spec(str(_study_file(tmp_path)))
    with pytest.raises(UserError, match="was not made by cifar-hpo"):
        create.open_study(spec, url, "hash", storage.open_storage(url))
    assert optuna.load_study(study_name="tiny", storage=url).user_attrs == {}


def test_a_study_another_run_is_creating_is_waited_for(tmp_path: Path) -> None:
    """Two runs started together: the second may see the study before the first wrote its attributes."""
    url = _foreign(tmp_path / "db.sqlite3", trials=0)
    spec = load_spec(str(_study_file(tmp_path)))

    def finish_creating() -> None:
        time.sleep(0.5)
        optuna.load_study(study_name="tiny", storage=url).set_user_attr("split_hash", "hash")

    creator = threading.Thread(target=finish_creating)
    creator.start()
    try:
        summary = create.existing_study(spec, url, storage.open_storage(url))
    finally:
        creator.join()
    assert summary is not None and summary.user_attrs["split_hash"] == "hash"


# ---------------------------------------------------------------- readers write nothing (case 2)


def test_status_changes_nothing_in_a_database_another_tool_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db.sqlite3"
    url = _foreign(db, name="other")
    before = _state(db)
    assert before[1] == "delete"
    assert cli.main(["status", "--storage", url]) == 0
    assert cli.main(["status", "--storage", url, "--study", "other"]) == 0
    assert "other" in capsys.readouterr().out
    assert _state(db) == before  # still journal mode delete, no -wal/-shm left, not a byte changed


@pytest.mark.parametrize("content, fragment", [(b"", "is an empty file (0 bytes)"), (b"not a database " * 40, "not an SQLite database")])
def test_status_refuses_a_file_that_is_no_study_database_and_leaves_it(content: bytes, fragment: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    db = tmp_path / "x.db"
    db.write_bytes(content)
    _one_line_error(capsys, cli.main(["status", "--storage", f"sqlite:///{db}"]), fragment)
    assert db.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def test_another_apps_sqlite_database_is_not_a_study_database(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    before = _state(db)
    with pytest.raises(UserError, match="without Optuna's tables"):
        storage.open_existing(f"sqlite:///{db}")
    assert _state(db) == before


def test_an_empty_database_is_refused_by_readers_and_left_to_run(tmp_path: Path) -> None:
    """A run stopped between its WAL switch and its schema leaves a database without tables: the next run fills it."""
    db = tmp_path / "db.sqlite3"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    url = f"sqlite:///{db}"
    with pytest.raises(UserError, match="is an empty SQLite database, not a study database"):
        storage.open_existing(url)
    assert storage.open_existing(url, empty_ok=True) is None
    create.refuse_foreign(load_spec(str(_study_file(tmp_path))), url)  # nothing to refuse: run may create its study here


def test_the_tables_a_study_database_is_recognised_by_are_optunas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    optuna.create_study(storage=url)
    con = sqlite3.connect(tmp_path / "db.sqlite3")
    tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert storage.sqlite.OPTUNA_TABLES <= tables


def _no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard returns once its server is listening (the old code served through optuna_dashboard.run_server)."""
    import optuna_dashboard

    monkeypatch.setattr(optuna_dashboard, "run_server", lambda *a, **k: None)
    monkeypatch.setattr(WSGIServer, "serve_forever", lambda self, *a, **k: None)


def test_the_dashboard_opens_another_tools_database_without_changing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    db = tmp_path / "db.sqlite3"
    url = _foreign(db, name="other")
    before = _state(db)
    _no_serving(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["dashboard", "--storage", url, "--results", str(tmp_path / "results"), "--port", str(port)]) == 0
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out
    assert _state(db) == before and not (tmp_path / "artifacts").exists()  # no artifact folder made either


def test_readers_of_a_running_studys_database_see_its_latest_commits(tmp_path: Path) -> None:
    """Read-only connections still use the WAL (not ``immutable``): a reader sees what the writer just committed."""
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = optuna.create_study(study_name="s", storage=storage.open_storage(url))  # a run's storage, held open
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert Path(f"{tmp_path}/db.sqlite3-wal").exists()  # the run's commits are in the WAL
    reader = storage.open_existing(url)
    assert reader is not None and len(optuna.load_study(study_name="s", storage=reader).trials) == 2
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=reader).trials) == 3
    with pytest.raises(optuna.exceptions.StorageInternalError) as e:  # what a reader does cannot write
        optuna.create_study(study_name="t", storage=reader)
    assert "readonly database" in str(e.value.__cause__)


@pytest.mark.postgres
def test_status_on_a_server_database_without_studies_creates_no_tables(capsys: pytest.CaptureFixture[str]) -> None:
    import sqlalchemy

    admin = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    schema = f"cifar_hpo_empty_{time.monotonic_ns()}"
    with admin.begin() as con:
        con.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        assert cli.main(["status", "--storage", url]) == 0
        assert "no study database at" in capsys.readouterr().out
        with admin.connect() as con:
            tables = con.exec_driver_sql(f"SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}'").scalar()
        assert tables == 0
    finally:
        with admin.begin() as con:
            con.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


# ---------------------------------------------------------------- seeds, epochs, trials (cases 3, 10)


def _raw(**changes: Any) -> dict[str, Any]:
    return {"model": "baseline_cnn", "search_space": "baseline", "epochs": 1, "trials": 1, **changes}


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"seed": -1}, "seed must be in [0, 2**31)"),
        ({"seed": 2**31}, "seed must be in [0, 2**31)"),
        ({"seed": 10**20}, "seed must be in [0, 2**31)"),
        ({"data": {"split_seed": -1}}, "data.split_seed must be in [0, 2**31)"),
        ({"epochs": 10**12}, "epochs must be <= 10,000"),
        ({"trials": 10**6}, "trials must be <= 100,000"),
    ],
)
def test_seeds_epochs_and_trials_out_of_bounds_are_refused(changes: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        parse_spec(_raw(**changes), tmp_path / "s.toml")
    assert fragment in str(e.value) and "s.toml" in str(e.value)


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    spec = parse_spec(_raw(seed=2**31 - 1, epochs=10_000, trials=100_000), tmp_path / "s.toml")
    assert spec.seed == 2**31 - 1 and spec.with_overrides(epochs=10_000, trials=100_000).epochs == 10_000


@pytest.mark.parametrize("override, fragment", [({"epochs": 10**12}, "--epochs must be <= 10,000"),
                                                ({"trials": 10**6}, "--trials must be <= 100,000")])  # fmt: skip
def test_command_line_epochs_and_trials_are_bounded(override: dict[str, int], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=fragment):
        parse_spec(_raw(), tmp_path / "s.toml").with_overrides(**override)


def test_a_seed_out_of_bounds_leaves_no_database(tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.toml"
    study.write_text(study_toml(epochs=1, trials=1).replace("seed = 0", "seed = -1"))
    _one_line_error(capsys, cli.main(_run(tmp_path, folder, study)), "seed must be in [0, 2**31)")
    assert not (tmp_path / "db.sqlite3").exists() and not (tmp_path / "results").exists()


# ---------------------------------------------------------------- status of a multi-objective study (case 4)


def test_status_of_a_multi_objective_study_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _foreign(tmp_path / "db.sqlite3", name="mo", trials=2, directions=("maximize", "minimize"))
    assert cli.main(["status", "--storage", url]) == 0  # the list of studies still shows it
    assert "mo" in capsys.readouterr().out
    _one_line_error(capsys, cli.main(["status", "--storage", url, "--study", "mo"]), "has 2 objectives")


# ---------------------------------------------------------------- the dashboard's address (case 5)


@pytest.fixture
def taken_port() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "where, fragment",
    [
        ("taken", "is in use by another program; pass another --port"),
        (["--port", "99999"], "--port 99999 is not a port"),
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding fails here, nothing is sent.
        (["--host", "192.0.2.1", "--port", "18089"], "192.0.2.1 is not an address of this machine"),
    ],
)
def test_a_dashboard_address_it_cannot_listen_on_is_one_line(where: Any, fragment: str, tmp_path: Path, taken_port: int,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    url = _foreign(tmp_path / "db.sqlite3", name="other", trials=1)
    _no_serving(monkeypatch)  # were it to listen after all, the test ends instead of serving
    address = ["--port", str(taken_port)] if where == "taken" else where
    code = cli.main(["dashboard", "--storage", url, "--results", str(tmp_path / "results"), *address])
    out = capsys.readouterr()
    assert code == 2 and fragment in out.err and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    assert "optuna-dashboard on" not in out.out  # no address announced that it does not serve


# ---------------------------------------------------------------- [arch] values (case 6)


BAD_ARCH = [
    ("fast_cnn", "width", "x"), ("fast_cnn", "width", math.nan), ("fast_cnn", "width", 1e308), ("fast_cnn", "width", -1),
    ("fast_cnn", "width", 0), ("fast_cnn", "stem_stride", 0), ("fast_cnn", "tta", 3), ("fast_cnn", "bn_momentum", 1.0),
    ("fast_cnn", "logit_scale", 0.0), ("fast_cnn", "logit_scale", math.inf), ("fast_cnn", "act", "tanh"),
    ("fast_cnn", "widths", [32, 64]), ("fast_cnn", "widths", [32, 0, 64]), ("fast_cnn", "widths", "32,64,64"),
    ("fast_cnn", "identity_init", 1), ("mlp", "hidden", 0), ("mlp", "hidden", 1.5), ("mlp", "depth", 0),
    ("mlp", "image_size", 16), ("resnet18", "upsample", 16), ("resnet18", "cifar_stem", "yes"),
    ("densenet121", "head_hidden", -1),
]  # fmt: skip


@pytest.mark.parametrize("model, key, value", BAD_ARCH)
def test_a_bad_arch_value_is_refused_when_the_study_file_loads(model: str, key: str, value: Any, tmp_path: Path) -> None:
    search_space = {"fast_cnn": "fast", "mlp": "mlp", "resnet18": "resnet", "densenet121": "densenet"}[model]
    raw = _raw(model=model, search_space=search_space, arch={key: value})
    with pytest.raises(UserError) as e:
        parse_spec(raw, tmp_path / "s.toml")
    assert f"s.toml: arch.{key} must be" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("model, key, value", [("fast_cnn", "width", -1), ("fast_cnn", "stem_stride", 0), ("mlp", "depth", 0)])
def test_a_bad_arch_value_is_refused_by_train_set_and_by_build(model: str, key: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"--set arch.{key}={value}: must be"):
        models.params_for(model, [f"arch.{key}={value}"])
    with pytest.raises(UserError, match=rf"{model}: arch.{key} must be"):
        models.build(TrialParams(model=model, arch={key: value}), 10)


def test_a_bad_arch_value_in_a_run_stores_no_trial(tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.toml"
    study.write_text(study_toml(epochs=1, trials=1).replace('"baseline_cnn"', '"fast_cnn"').replace('"baseline"', '"fast"')
                     + "[arch]\nstem_stride = 0\n")  # fmt: skip
    _one_line_error(capsys, cli.main(_run(tmp_path, folder, study)), "arch.stem_stride must be one of 1, 2, got 0")
    assert not (tmp_path / "db.sqlite3").exists()


def test_every_recipe_and_every_bundled_search_space_keeps_to_its_models_rules() -> None:
    for name, entry in models.MODELS.items():
        for recipe in entry.recipes.values():
            assert entry.arch_problem(recipe.arch) is None, name
    for spec in list_specs():  # each bundled study loads (its [arch] passes) and its space draws only valid values
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            params = suggest_params(spec, study.ask())
            assert models.MODELS[spec.model].arch_problem(params.arch) is None, (spec.name, params.arch)


def test_widths_can_be_set_in_a_study_file(tmp_path: Path) -> None:
    spec = parse_spec(_raw(model="fast_cnn", search_space="fast", arch={"widths": [16, 32, 32]}), tmp_path / "s.toml")
    net = models.build(TrialParams(model="fast_cnn", arch=spec.arch), 10)
    assert [g[0].out_channels for g in net.groups] == [16, 32, 32]  # type: ignore[index, union-attr]


# ---------------------------------------------------------------- --workers (case 7)


def test_more_workers_than_cores_are_refused_before_any_process_starts(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    started: list[int] = []
    monkeypatch.setattr("cifar_hpo.commands.run.run_workers", lambda *a, **k: started.append(k["workers"]) or 0)
    too_many = str(supervisor.WORKERS_PER_CORE * supervisor.cpu_threads() + 1)
    _one_line_error(capsys, cli.main(_run(tmp_path, folder, _study_file(tmp_path), "--workers", too_many)), f"--workers {too_many} is")
    assert started == [] and not (tmp_path / "db.sqlite3").exists()


def test_the_workers_bound_is_the_cores_or_a_few_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    bound = 3 * supervisor.WORKERS_PER_CORE
    supervisor.check_workers(bound, "cpu")
    with pytest.raises(UserError, match=rf"--workers {bound + 1} is more .*per CPU core, 3 core.*: pass --workers {bound} or fewer"):
        supervisor.check_workers(bound + 1, "cpu")
    with pytest.raises(UserError, match="--workers must be >= 1"):
        supervisor.check_workers(0, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    bound = 2 * supervisor.WORKERS_PER_GPU
    supervisor.check_workers(bound, "auto")
    with pytest.raises(UserError, match=f"pass --workers {bound} or fewer"):
        supervisor.check_workers(bound + 1, "cuda")
    with pytest.raises(UserError, match=f"pass --workers {supervisor.WORKERS_PER_GPU} or fewer"):
        supervisor.check_workers(supervisor.WORKERS_PER_GPU + 1, "cuda:1")


# ---------------------------------------------------------------- --storage and --timeout (cases 8, 9)


def test_a_storage_path_in_a_folder_that_does_not_exist_is_refused(tmp_path: Path, folder: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    db = tmp_path / "no" / "such" / "x.db"
    _one_line_error(capsys, cli.main(_run(tmp_path, folder, _study_file(tmp_path), db=db)), "does not exist; create it first")
    assert not (tmp_path / "no").exists() and not (tmp_path / "results").exists()


def test_the_default_database_folder_under_results_is_still_made(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(storage.ENV_VAR, raising=False)
    results = tmp_path / "new" / "results"
    argv = ["run", "--study", str(_study_file(tmp_path)), "--data", str(folder), "--device", "cpu", "--results", str(results),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(argv) == 0
    assert (results / storage.DB_NAME).is_file()


@pytest.mark.parametrize("timeout", ["-5", "0", "nan"])
def test_a_timeout_that_is_not_positive_is_refused_before_anything_is_written(timeout: str, tmp_path: Path, folder: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _one_line_error(capsys, cli.main(_run(tmp_path, folder, _study_file(tmp_path), "--timeout", timeout)), "--timeout must be > 0")
    assert not (tmp_path / "db.sqlite3").exists() and not (tmp_path / "results").exists()


# ---------------------------------------------------------------- resuming with other epochs (case 11)


def test_resuming_with_other_epochs_is_refused_once_trials_finished(tmp_path: Path, folder: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    study = _study_file(tmp_path)
    assert cli.main(_run(tmp_path, folder, study, "--epochs", "1")) == 0
    capsys.readouterr()
    db = tmp_path / "db.sqlite3"
    before = _state(db)
    code = cli.main(_run(tmp_path, folder, study, "--epochs", "2", "--trials", "2"))
    _one_line_error(capsys, code, "has 1 finished trials of 1 epochs each and this run asks for 2: run it with --epochs 1")
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").trials
    assert len(trials) == 1 and _state(db)[0] == before[0]


def test_a_study_without_finished_trials_takes_the_new_epochs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    st = storage.open_storage(url)
    spec = load_spec(str(_study_file(tmp_path, epochs=1)))
    create.open_study(spec, url, "hash", st)
    study = create.open_study(spec.replace(epochs=3), url, "hash", st)  # nothing finished at 1 epoch: allowed
    assert study.user_attrs["spec"]["epochs"] == 3
    study.enqueue_trial({})
    trial = study.ask()
    study.tell(trial, 0.5)
    with pytest.raises(UserError, match="of 3 epochs each and this run asks for 1"):
        create.open_study(spec, url, "hash", st)
