"""Command line: ``cifar-hpo COMMAND ...``.

    cifar-hpo run --study densenet --trials 50
    cifar-hpo status
    cifar-hpo retrain --study densenet
    cifar-hpo report

Each subcommand is a `Command`: the module named after it (``main(args)``),
its one-line help and its flags. The module is imported only when the command
runs, so ``--help`` answers at once without torch or optuna.
Errors a user can cause are printed as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cifar_hpo.errors import UserError

# ---------------------------------------------------------------- shared flags


def _add_data_flags(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    p.add_argument(
        "--data",
        default=default,
        help="data source: 'cifar10' (torchvision download), an ImageFolder folder with train/ and test/, "
        "a .tar/.tar.gz of one, or a cifar-10-batches-py folder"
        + (f" (default: {default})" if default else " (default: the study file's)"),
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where 'cifar10' is downloaded (default: ~/.cache/cifar-hpo/data)")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-array cache (default: ~/.cache/cifar-hpo/decoded)")


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")


def _add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object on the last line")


def _add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study database, e.g. postgresql+psycopg://user@host/db "
        "(default: $CIFAR_HPO_STORAGE, else sqlite:///results/cifar_hpo.db)",
    )


def _add_results_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"), help="output folder (default: results)")


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """A subcommand: the module (under ``cifar_hpo``) whose ``function(args)`` runs it, its one-line help, its flags."""

    module: str
    summary: str
    add_args: Callable[[argparse.ArgumentParser], None]
    function: str = "main"

    def __call__(self, args: argparse.Namespace) -> int:
        # Imported here, not at the top, so that --help answers without loading torch or optuna.
        run = getattr(importlib.import_module(f"cifar_hpo.{self.module}"), self.function)
        return int(run(args) or 0)


# ---------------------------------------------------------------- parsers


def _parser_explore(p: argparse.ArgumentParser) -> None:
    _add_data_flags(p, default="cifar10")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG grids and counts")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train (default: 0.1)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default: 42)")
    p.add_argument("--per-class", type=int, default=5, help="sample images per class (default: 5)")


def _parser_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name from the registry (see models.MODELS)")
    _add_data_flags(p, default="cifar10")
    _add_device_flag(p)
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.add_argument("--subset", type=int, default=None, help="train on a stratified subset of N images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and augmentation (default: 0)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="set a TrialParams field, e.g. --set lr=0.01 (repeatable)"
    )
    p.add_argument("--save", type=Path, default=None, help="write the trained weights to this checkpoint")


def _add_bank_flags(b: argparse.ArgumentParser) -> None:
    _add_data_flags(b, default="cifar10")
    _add_device_flag(b)
    b.add_argument("--study", default="fast_light", help="study whose search space and network are sampled (default: fast_light)")
    b.add_argument("--configs", type=int, default=32, help="configurations in the bank (default: 32)")
    b.add_argument("--epochs", type=int, default=None, help="epochs per configuration (default: the study's)")
    b.add_argument("--train-images", type=int, default=2500, help="stratified training subset (default: 2500)")
    b.add_argument("--val-images", type=int, default=2500, help="stratified validation subset (default: 2500)")
    b.add_argument("--seed", type=int, default=0, help="seed of the draws and the subset (default: 0)")
    b.add_argument("--bank-dir", type=Path, default=None, help="where banks are kept (default: $CIFAR_HPO_CACHE/banks)")


def _parser_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    b = sub.add_parser("data", help="images/s of augmented batches: ours vs a DataLoader with PIL transforms")
    _add_data_flags(b, default="cifar10")
    _add_device_flag(b)
    b.add_argument("--batch-size", type=int, default=512, help="batch size (default: 512)")
    b.add_argument("--seconds", type=float, default=10.0, help="time per side (default: 10)")
    b.add_argument("--strength", type=float, default=1.0, help="our augmentation strength, all ops on (default: 1.0)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads for ours (default: 1)")
    _add_json_flag(b)
    b = sub.add_parser("train", help="training images/s per model on the current device")
    _add_device_flag(b)
    b.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    b.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per model (default: 10)")
    b.add_argument(
        "--precision", default="fp32,bf16", help="comma-separated precisions measured side by side (default: fp32,bf16)"
    )
    _add_json_flag(b)
    b = sub.add_parser("profile", help="one CPU training epoch taken apart (augment, forward, backward, optimizer, "
                       "lookahead, evaluation) per thread count, memory format, batch size, precision and instruction set")
    b.add_argument("--study", default="fast_light", help="study whose recipe network is profiled (default: fast_light)")
    b.add_argument("--isa", default="native",
                   help="instruction sets, each in its own process: native, avx512 (no AMX), avx2 (no AVX-512); "
                   "comma-separated (default: native)")
    b.add_argument("--threads", default="1,2", help="torch threads, comma-separated (default: 1,2)")
    b.add_argument("--formats", default="channels_last,contiguous", help="memory formats (default: channels_last,contiguous)")
    b.add_argument("--batch-sizes", default=None, help="training batch sizes, comma-separated (default: the recipe's)")
    b.add_argument("--precisions", default="auto", help="fp32, bf16, auto, comma-separated (default: auto)")
    b.add_argument("--images", type=int, default=4096, help="synthetic training images per measurement (default: 4096)")
    b.add_argument("--eval-images", type=int, default=1024, help="synthetic evaluation images (default: 1024)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported (default: 3)")
    _add_json_flag(b)
    b = sub.add_parser("time-to-accuracy", help="wall time until fast_cnn reaches --target test accuracy")
    _add_data_flags(b, default="cifar10")
    _add_device_flag(b)
    b.add_argument("--target", type=float, default=0.70, help="test accuracy to reach (default: 0.70)")
    b.add_argument("--epochs", type=int, default=None,
                   help="epochs of the schedule (default: planned for the target, see bench/time_to_accuracy.py LADDER)")
    b.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    b.add_argument("--seeds", type=int, default=1, help="runs, seeds seed..seed+N-1, one after another (default: 1)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a fast_cnn default")
    _add_json_flag(b)
    b = sub.add_parser("pruning", help="the same small study with the default pruner and with none")
    _add_data_flags(b, default="cifar10")
    _add_device_flag(b)
    b.add_argument("--study", default="fast_light", help="study file whose space, network and pruner run (default: fast_light)")
    b.add_argument("--trials", type=int, default=12, help="trials per study (default: 12)")
    b.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the study's)")
    b.add_argument("--train-images", type=int, default=2500, help="stratified training subset, as bench curves (default: 2500)")
    b.add_argument("--val-images", type=int, default=2500, help="stratified validation subset, as bench curves (default: 2500)")
    b.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    b.add_argument("--seeds", type=int, default=1, help="pairs of studies, sampler seeds seed.. (default: 1)")
    b.add_argument("--sampler", default=None, choices=["tpe", "random"],
                   help="sampler of both studies (default: the study file's; random = the same trials in both, as the replay)")
    b.add_argument("--pruner", default=None, choices=["promote", "hyperband", "successive_halving", "median"],
                   help="pruner to compare with none (default: the study file's)")
    b.add_argument("--reduction-factor", type=int, default=None, help="hyperband/successive halving reduction factor")
    _add_json_flag(b)
    b = sub.add_parser("curves", help="record learning-curve banks (per-epoch validation accuracy) from real training")
    _add_bank_flags(b)
    b.add_argument("--designs", default="onecycle,wsd", help="fidelity designs, comma-separated (default: onecycle,wsd)")
    b = sub.add_parser("search", help="replay pruning rules on recorded learning curves over many seeds")
    _add_bank_flags(b)
    b.add_argument("--trials", type=int, default=24, help="trials per replayed study (default: 24)")
    b.add_argument("--seeds", type=int, default=20, help="draws replayed (default: 20)")
    b.add_argument("--topk", type=int, default=None, help="k of the one-epoch-top-k baseline (default: a third of the epochs)")
    b.add_argument("--bank", action="append", default=[], help="replay these bank files instead (repeatable)")
    b.add_argument("--no-record", action="store_true", help="replay the cached banks as they are, even if partial")
    b.add_argument("--samplers", action="store_true", help="also compare TPE with random search on the bank")
    b.add_argument("--plot", default=None, help="write the best-vs-epochs figure to this PNG")
    _add_json_flag(b)
    b = sub.add_parser("faults", help="kill workers during a study; count trials finished, lost and left RUNNING")
    _add_storage_flag(b)
    b.add_argument("--trials", type=int, default=12, help="trials (default: 12)")
    b.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    b.add_argument("--kills", type=int, default=3, help="SIGKILLs to inject (default: 3)")
    b.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: 6)")
    b.add_argument("--seed", type=int, default=0, help="seed of the kill times, victims and sampler (default: 0)")
    b.add_argument("--restart-db", action="store_true", help="also restart the local PostgreSQL server once mid-study (root)")
    b.add_argument("--repeat", type=int, default=1, help="run N studies (seeds SEED..SEED+N-1); report each and the totals (default: 1)")
    b.add_argument("--verbose", action="store_true", help="echo the study's output")
    _add_json_flag(b)
    b = sub.add_parser("device", help="run every CUDA path (gpu tests, training, data, time to accuracy, a study) on this "
                       "machine's accelerator, or their short CPU versions; device.json + device.md")
    b.add_argument("--data", default=None,
                   help="data of the data, time-to-accuracy and study steps (default: ../shared/data/cifar10-jpeg.tar.gz, "
                   "or shared/data/cifar10-jpeg.tar.gz, when it exists, else cifar10)")
    b.add_argument("--out", type=Path, default=Path("results/device"),
                   help="folder for device.json, device.md and one log per step (default: results/device)")
    _add_json_flag(b)


def _add_run_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name (see `cifar-hpo studies`) or path to a study .toml")
    _add_storage_flag(p)
    _add_results_flag(p)
    _add_data_flags(p)
    _add_device_flag(p)
    p.add_argument("--epochs", type=int, default=None, help="override the study file's epochs")
    p.add_argument("--subset", type=int, default=None, help="use a stratified subset of N training images")


def _parser_run(p: argparse.ArgumentParser) -> None:
    _add_run_overrides(p)
    p.add_argument("--trials", type=int, default=None, help="the study ends with this many finished trials (default: study file)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a TrialParams field for every trial after the search space, e.g. --set pretrained=false "
                   "(repeatable; recorded with the study, replayed by retrain)")
    p.add_argument("--budget", default=None, metavar="DURATION",
                   help="the study's compute budget, device time summed over all its trials, workers and machines, "
                   "e.g. 90m, 2h, 1.5h; with --trials, whichever ends first (default: the study file's budget, else none)")


def _parser_studies(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, help="folder of study files (default: the bundled studies/)")


def _parser_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", default=None, help="show this study's trials (default: list all studies)")
    _add_storage_flag(p)
    _add_results_flag(p)


def _parser_dashboard(p: argparse.ArgumentParser) -> None:
    _add_storage_flag(p)
    _add_results_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")


def _parser_retrain(p: argparse.ArgumentParser) -> None:
    _add_run_overrides(p)
    p.add_argument("--seeds", type=int, default=1, help="train once per seed 0..K-1 (default: 1)")
    p.add_argument("--trial", type=int, default=None, help="retrain this trial number instead of the best")
    p.add_argument("--default-params", action="store_true",
                   help="train the model's registry recipe (the study's recipe kind), not a trial (the baseline)")


def _parser_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study whose final model to export")
    _add_results_flag(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--data", default=None, help="data whose test images check the exported programs (default: the model's own source)")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-array cache (default: ~/.cache/cifar-hpo/decoded)")
    p.add_argument("--torchscript", action="store_true",
                   help="also write model.ts (TorchScript; deprecated since PyTorch 2.11, torch.jit.load warns on every load)")  # fmt: skip


def _parser_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="final.pt (from retrain), model.pt2 or model.onnx (from export)")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--top", type=int, default=1, help="classes shown per image (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON list of {path, class, probability, top} instead of text")


def _parser_report(p: argparse.ArgumentParser) -> None:
    _add_storage_flag(p)
    _add_results_flag(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/report)")


COMMANDS: dict[str, Command] = {
    "run": Command("commands.run", "Run or resume an Optuna study until it has --trials finished trials.", _parser_run),
    "studies": Command("commands.studies", "List the study files with a one-line description each.", _parser_studies, "main"),
    "status": Command("commands.status", "Show a table of studies, or of one study's trials (safe while a run is going).", _parser_status),
    "dashboard": Command("commands.dashboard", "Start optuna-dashboard on the study storage and artifact store.", _parser_dashboard),
    "train": Command("commands.train", "Train one model outside any study and print per-epoch progress.", _parser_train),
    "retrain": Command("commands.retrain", "Retrain the best trial on train+validation and evaluate once on the test split.",
                       _parser_retrain),  # fmt: skip
    "report": Command("commands.report", "Compare every final model with the baseline: figures and summary tables.", _parser_report),
    "export": Command("commands.export",
                      "Export a final model as ONNX, a torch.export program, a checkpoint and a model card, each checked.",
                      _parser_export),  # fmt: skip
    "predict": Command("commands.predict",
                       "Classify images with a final.pt, model.pt2 or model.onnx (ONNX Runtime, no torch needed).",
                       _parser_predict),  # fmt: skip
    "explore": Command("commands.explore", "Write sample-image grids per class, augmentation previews and class counts.", _parser_explore),
    "bench": Command("bench", "Benchmarks measured side by side in one run (data, train, profile, time-to-accuracy, "
                     "pruning, faults, curves, search, device).",
                     _parser_bench),  # fmt: skip
}


def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree (also used by tests to check every --help)."""
    parser = argparse.ArgumentParser(
        prog="cifar-hpo",
        description="Hyperparameter-optimization studies for CIFAR-10 image classifiers (Optuna + PyTorch).",
        epilog="Start with: cifar-hpo studies; cifar-hpo run --study fast --trials 20",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.summary, description=command.summary)
        command.add_args(p)
        p.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cifar-hpo`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except UserError as e:
        print(f"cifar-hpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifar-hpo: interrupted; finished work is kept, run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`cifar-hpo studies | head -1`): stop quietly, as other
        # tools do. Python would print a traceback flushing stdout at exit; point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
