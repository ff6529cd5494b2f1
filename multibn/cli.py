"""The ``multibn`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("multibn.demo", "run batch_norm on every installed backend and show that they agree"),
    "port": ("multibn.port", "convert BN parameters and running statistics between frameworks' checkpoints"),
    "bench": ("multibn.bench", "speed against each framework's native BN and the memory roofline"),
    "check": ("multibn.check", "conformance battery: every backend and convention against float64 and native BN"),
    "train": ("multibn.train", "the textbook BN experiments (LeNet, deep tanh MLP, BN placement) on every backend"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multibn", description=__doc__.splitlines()[0])
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
