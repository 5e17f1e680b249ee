"""cifar-hpo: hyperparameter-optimization studies for CIFAR-10 on Optuna and PyTorch.

Where a change goes (one subpackage per concept; layers import downwards only, lowest last):

    cli.py      argparse only: parses and dispatches to commands/
    commands/   one module per command, ``main(args)``; with bench/, the only code that reads argparse
    bench/      ``cifar-hpo bench ...``: benchmarks that compare side by side in one run
    report/     plot data, figures, the page (``cifar-hpo report``)
    deploy/     export (ONNX, torch.export, each checked) and predict (the ONNX path needs no torch)
    study/      a study file (spec), search spaces, pruning, the objective, the worker loop and its
                supervisor, the dashboard note, retraining the best trial
    training/   the loop, optimizers and schedules, evaluation, precision, augmentation on the device
    models/     the registry (one entry per architecture, what training asks of it), one module per
                family, the final.pt format
    data/       sources, decoding, the decoded-array cache, the split, tensors on the device
    storage/    the study database (SQLite or PostgreSQL), heartbeats and retries, the trial record,
                artifacts, checkpoints, Optuna's private names
    errors, params, device, plots: values and helpers every layer uses (UserError, TrialParams,
                the device and its CPU, the one matplotlib setup)

tests/test_layout.py checks the layers, the absence of import cycles and that every import inside a
function says why it is there.
"""

__version__ = "0.1.0"
