"""cifar-hpo: hyperparameter-optimization studies for CIFAR-10 on Optuna and PyTorch."""

__version__ = "0.1.0"
