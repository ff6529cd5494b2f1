"""The ``multibn`` command. Each subcommand is a module of this package with ``add_arguments`` and ``run``; they
share :mod:`.usage` (the usage error, the output-path check). The commands import the library, never the reverse.
"""

from __future__ import annotations

import argparse
import importlib

from .usage import UsageError, check_outputs

__all__ = ["COMMANDS", "UsageError", "check_outputs", "main"]

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("multibn.cli.demo", "run batch_norm on every installed backend and show that they agree"),
    "port": ("multibn.cli.port", "convert BN parameters and running statistics between frameworks' checkpoints"),
    "bench": ("multibn.cli.bench", "speed against each framework's native BN and the memory roofline"),
    "check": ("multibn.cli.check", "conformance battery: every backend and convention against float64 and native BN"),
    "train": ("multibn.cli.train", "the textbook BN experiments (LeNet, deep tanh MLP, BN placement) on every backend"),
}

DESCRIPTION = (
    "multibn: one batch-norm algorithm on NumPy, PyTorch, JAX and MXNet, with each framework's conventions. "
    "With no command, runs the demo. `multibn COMMAND --help` describes a command."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multibn", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    command = args.command or "demo"
    if args.command is None:
        args = parser.parse_args(["demo"])
    return int(modules[command].run(args) or 0)
