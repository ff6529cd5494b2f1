"""The ``multibn`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("multibn.demo", "run batch_norm on every installed backend and show that they agree"),
    "port": ("multibn.port", "convert BN parameters and running statistics between frameworks' checkpoints"),
    "bench": ("multibn.bench", "speed against each framework's native BN and the memory roofline"),
    "check": ("multibn.check", "conformance battery: every backend and convention against float64 and native BN"),
    "train": ("multibn.train", "the textbook BN experiments (LeNet, deep tanh MLP, BN placement) on every backend"),
}

DESCRIPTION = (
    "multibn: one batch-norm algorithm on NumPy, PyTorch, JAX and MXNet, with each framework's conventions. "
    "With no command, runs the demo. `multibn COMMAND --help` describes a command."
)


def output_problem(path: str) -> str | None:
    """Why a file cannot be written at ``path`` (a missing or read-only directory, a directory), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def check_outputs(command: str, **paths: str | None) -> int | None:
    """Exit status 2 and a one-line error if an output flag (``json=PATH``, ``plot=PATH``) cannot be written;
    None when every given path can. Called before any work, so that a long run does not end in a traceback."""
    for flag, path in paths.items():
        if path is not None and (why := output_problem(path)) is not None:
            print(f"multibn {command}: error: --{flag} {path}: {why}", file=sys.stderr)
            return 2
    return None


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


if __name__ == "__main__":
    sys.exit(main())
