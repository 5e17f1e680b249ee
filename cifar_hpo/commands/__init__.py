"""One module per command, each with ``main(args) -> int``: the only code that reads an argparse namespace.

``cli.COMMANDS`` maps a command name to its module; a module is imported only when its command runs,
so ``cifar-hpo --help`` answers without torch or Optuna. A command parses its flags into plain values
and calls the layers below (study, training, report, deploy, ...); commands never import each other.
"""
